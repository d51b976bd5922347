"""Class accuracy of the generators on a fixed, already trained tokenizer ("testbed"): trains
the generator job of stage 2 on the testbed's cached ids for a fixed step budget, then samples
balanced labels under one or more sampling settings and judges them with the domain evaluator
(class accuracy; domain FD against real test images). Also measures the testbed's own ceiling:
the class accuracy of its reconstructions of real test images from the ids the generators model.

    python bench/generators.py ceiling --testbed runs/gen/testbed/sbt
    python bench/generators.py run --testbed runs/gen/testbed/sbt --name base --steps 1000 --seed 0
    python bench/generators.py run ... --set generator_cond=adaln --sample guidance=4,temperature=0.8
    python bench/generators.py table --out runs/gen/results

Each `run` writes one JSON per (name, testbed, steps, seed) into --out; `table` prints the
mean and spread over seeds per (name, testbed, steps, generator, sampling).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from selfboottok import SelfBootTok
from selfboottok.data import build_dataset
from selfboottok.data.ids import write_ids
from selfboottok.eval.domain import domain_evaluator
from selfboottok.eval.fid import fid_from_features
from selfboottok.eval.generation import class_accuracy, class_information, generation_metrics, sample_features
from selfboottok.training import train_stage2

# the demo's generator job: batch 32, 20 warm-up steps, lr 2e-3
JOB = {"train.batch_size": 32, "train.warmup_steps": 20, "train.lr": 2e-3, "train.log_every": 50,
       "train.sample_every": 10**9, "train.ckpt_every": 10**9}
SAMPLING = [{"guidance": 4.0, "temperature": 0.8}]  # the demo's
N_TRAIN, N_TEST = 10_000, 1000


def _parse_value(text):
    return yaml.safe_load(text)


def _settings(pairs):
    """['a=1', 'b.c=x'] -> {'a': 1, 'b.c': 'x'}."""
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        if not key or not _:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def _sampling(texts):
    """['guidance=4,temperature=0.8', ...] -> list of dicts (the demo's setting if none)."""
    if not texts:
        return SAMPLING
    rows = []
    for text in texts:
        rows.append({k: _parse_value(v) for k, _, v in (p.partition("=") for p in text.split(","))})
    return rows


def _ids_folder(testbed, work):
    """The testbed's ids of the training set, written once."""
    folder = Path(work) / "ids" / Path(testbed).resolve().name
    if not (folder / "manifest.json").is_file() or not json.loads((folder / "manifest.json").read_text()).get("complete"):
        model = SelfBootTok.from_pretrained(testbed).eval()
        write_ids(model, build_dataset("synthetic", 32, n=N_TRAIN, seed=0), folder,
                  source={"dataset": "synthetic", "n": N_TRAIN, "seed": 0}, batch_size=250)
    return folder


def _real(n=N_TEST):
    test = build_dataset("synthetic", 32, n=n, seed=0, split="test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    return images, labels


def _test_ids(model, work, testbed):
    """(ids, labels) of the real test images under the testbed's tokenizer, computed once."""
    path = Path(work) / "ids" / f"test_{Path(testbed).resolve().name}.pt"
    if not path.is_file():
        images, labels = _real()
        with torch.no_grad():
            ids = torch.cat([model.tokenize(x).ids for x in images.split(250)])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ids": ids, "labels": labels}, path)
    saved = torch.load(path)
    return saved["ids"], saved["labels"]


def ceiling(args):
    """Class accuracy of the testbed's reconstructions from the generators' ids alone."""
    model = SelfBootTok.from_pretrained(args.testbed).eval()
    ev = domain_evaluator("synthetic", 32, progress=False)
    images, labels = _real()
    with torch.no_grad():
        rec = torch.cat([model.reconstruct(x, bootstrap=True) for x in images.split(250)])
    acc = class_accuracy(ev.predict(rec)["label"], labels, 10)
    fd = fid_from_features(ev.features(rec), ev.features(images))
    out = {"testbed": str(args.testbed), "class_acc": acc["class_acc"],
           "per_class": acc["class_acc_per_class"], "domain_fd": fd,
           "real_class_acc": class_accuracy(ev.predict(images)["label"], labels, 10)["class_acc"]}
    print(json.dumps(out, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"ceiling_{Path(args.testbed).name}.json").write_text(json.dumps(out, indent=1))


def evaluate(model, sampling, n, ev, real_feats, kinds):
    rows = []
    for kind in kinds:
        for setting in sampling:
            setting = {k: v for k, v in setting.items() if not (kind == "ar" and k == "steps")}
            samples = sample_features(model, n, evaluator=ev, batch_size=250, progress=False,
                                      generator=kind, seed=1000, **setting)
            m = generation_metrics(samples, real_feats, model.config.num_classes,
                                   what=("class_acc", "domain_fd"))
            rows.append({"generator": kind, "sampling": setting, "class_acc": m["class_acc"],
                         "per_class": m["class_acc_per_class"], "domain_fd": m["domain_fd"],
                         "seconds": round(samples["seconds"], 1)})
            print(f"  {kind} {setting}: class_acc {m['class_acc']:.3f} fd {m['domain_fd']:.1f} "
                  f"per class {[round(x, 2) for x in m['class_acc_per_class']]}", flush=True)
    return rows


def run(args):
    testbed = Path(args.testbed)
    work, out = Path(args.work), Path(args.out)
    tag = f"{args.name}_{testbed.name}_{args.steps}_s{args.seed}"
    result_path = out / f"{tag}.json"
    if result_path.is_file() and not args.force and not args.resample:
        print(f"{tag}: done already")
        return
    args.generators = args.generators or ["maskgit", "ar"]
    ids = _ids_folder(testbed, work)
    over = {**JOB, "generators": list(args.generators), "seed": args.seed, **_settings(args.set)}
    config = SelfBootTok.from_pretrained(testbed).config.with_overrides(**over)
    model_dir = work / "models" / tag
    t0 = time.time()
    if args.resample and (model_dir / "model" / "model.safetensors").is_file():
        train_s = json.loads(result_path.read_text())["train_seconds"] if result_path.is_file() else None
    else:
        train_stage2(config, testbed, model_dir, parts=("generator",), ids=ids, total_steps=args.steps)
        train_s = round(time.time() - t0, 1)
    model = SelfBootTok.from_pretrained(model_dir / "model").eval()
    ev = domain_evaluator("synthetic", 32, progress=False)
    real_feats = ev.features(_real()[0])
    print(f"{tag}: trained in {train_s} s", flush=True)
    info = class_information(model, *_test_ids(model, work, testbed))
    print(f"  test nll / class nats per token: {info}", flush=True)
    rows = evaluate(model, _sampling(args.sample), args.n, ev, real_feats, args.generators)
    last = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()][-1]
    if args.resample and result_path.is_file():  # keep the rows of other sampling settings
        seen = {(r["generator"], json.dumps(r["sampling"], sort_keys=True)) for r in rows}
        before = json.loads(result_path.read_text())
        rows = [r for r in before["rows"]
                if (r["generator"], json.dumps(r["sampling"], sort_keys=True)) not in seen] + rows
        info = {**before.get("class_information", {}), **info}
    result = {"name": args.name, "testbed": testbed.name, "steps": args.steps, "seed": args.seed,
              "overrides": _settings(args.set), "train_seconds": train_s, "final_losses": last, "class_information": info,
              "n": args.n, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))


def _fmt_sampling(setting):
    return ", ".join(f"{k} {v}" for k, v in setting.items())


def table(args):
    """Mean ± half the range over seeds, per (name, testbed, steps, generator, sampling)."""
    groups = {}
    for path in sorted(Path(args.out).glob("*.json")):
        r = json.loads(path.read_text())
        if "rows" not in r or (args.names and r["name"] not in args.names):
            continue
        for row in r["rows"]:
            if args.generators and row["generator"] not in args.generators:
                continue
            info = r.get("class_information", {}).get(row["generator"], {})
            key = (r["name"], r["testbed"], r["steps"], row["generator"], _fmt_sampling(row["sampling"]))
            groups.setdefault(key, []).append((r["seed"], row["class_acc"], row["domain_fd"],
                                               info.get("class_nats", float("nan"))))
    print("| run | testbed | steps | generator | sampling | seeds | class acc | domain FD | class nats/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, vals in sorted(groups.items()):
        acc, fd, nats = (np.array([v[i] for v in vals]) for i in (1, 2, 3))
        seeds = ",".join(str(v[0]) for v in sorted(vals))
        print(f"| {' | '.join(map(str, key))} | {seeds} | {acc.mean():.3f} ± {np.ptp(acc) / 2:.3f} | "
              f"{fd.mean():.1f} ± {np.ptp(fd) / 2:.1f} | {nats.mean():.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ceiling", "run", "table"])
    p.add_argument("--testbed", default="runs/gen/testbed/sbt")
    p.add_argument("--name", default="base")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", help="config override key=value (repeatable)")
    p.add_argument("--sample", action="append", help="sampling setting k=v,k=v (repeatable)")
    p.add_argument("--generators", nargs="+", default=None, help="default: both (table: all)")
    p.add_argument("--names", nargs="+", help="table: only these runs")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--work", default="runs/gen/work")
    p.add_argument("--out", default="runs/gen/results")
    p.add_argument("--force", action="store_true")
    p.add_argument("--resample", action="store_true", help="reuse the trained model, sample again")
    args = p.parse_args()
    torch.set_num_threads(1)
    {"ceiling": ceiling, "run": run, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
