"""Tokenizer quality on a fixed step budget: SelfBootTok (global-only and full paths) against
the TiTok-style baseline (`generator_tokens="all"`), on the embedded synthetic data, over
several seeds. Each model trains stage 1 for 2000 steps at batch 32, then the decoder job of
stage 2 (bootstrap + pixel decoder; the baseline fine-tunes its pixel decoder) for 1000 steps.

Per path it reports PSNR, SSIM, the domain evaluator's factor scores on the reconstructions
(class and texture-kind accuracy, R² of the continuous factors), the patch-seam ratio (real
images: about 1), and codebook use; per model, probes of what the tokens carry (class,
position and hue from the global tokens; texture kind from the local tokens). Writes
`quality-<machine>.{md,json}` and `quality-<machine>.png` (a grid: input, full path,
global-only path, baseline) into --out.

    python bench/quality.py                              # the full run (2 seeds, both modes)
    python bench/quality.py --smoke --out /tmp/q         # every table in a minute (CI)
    python bench/quality.py --set loss.l1=1 --tag l1 --out runs/quality/l1   # an experiment

Trained models go to --work (default: a temporary folder); finished trainings there are
reused when the script runs again with the same settings. On 2 cores the full run is fastest
as one-thread jobs side by side, one seed and mode each (`--threads 1 --seeds S --modes M`, one
shared --work), then the full command with that --work to evaluate all of them together: a
SelfBootTok job took 34 min, a baseline job about 16, the final evaluation 8.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from _common import ROOT, elapsed, fmt, log, machine_name, machine_slug, mean_std, train_cached

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.data import build_dataset
from selfboottok.eval.domain import domain_evaluator
from selfboottok.eval.metrics import codebook_stats, psnr, seam_ratio, ssim
from selfboottok.eval.probes import token_probes
from selfboottok.eval.report import save_grid

SIZES = {
    "full": {"stage1_steps": 2000, "stage2_steps": 1000, "batch_size": 32, "n_train": 10_000,
             "n_test": 1000, "n_probe_train": 4000, "evaluator": {}},
    "smoke": {"stage1_steps": 4, "stage2_steps": 2, "batch_size": 8, "n_train": 128,
              "n_test": 32, "n_probe_train": 64,
              "evaluator": {"n_train": 256, "n_test": 64, "epochs": 1, "width": 8}},
}
MODES = {"global": "SelfBootTok", "all": "baseline"}
PATHS = {"full": "SelfBootTok, global + true local tokens",
         "global": "SelfBootTok, global tokens only (bootstrapped local)",
         "baseline": "baseline, all tokens quantized"}
PROBES = {"global tokens": ("label", "pos_x", "pos_y", "hue"), "local tokens": ("texture",)}
PROBE_KIND = "mlp"  # one hidden layer of 256 units; see selfboottok.eval.probes.mlp_probe
# the acceptance targets of the tokenizer-quality issue, checked in the report
TARGETS = [("full", "psnr", ">=", 26.0), ("global", "psnr", ">=", 23.0),
           ("full", "domain_texture", ">=", 0.85), ("full", "domain_label", ">=", 0.95),
           ("global", "domain_label", ">=", 0.90), ("full", "seam_over_real", "<=", 1.2),
           ("global", "seam_over_real", "<=", 1.2), ("probe", "global tokens/label", ">=", 0.8),
           ("probe", "global tokens/pos_x", ">=", 0.6), ("probe", "global tokens/pos_y", ">=", 0.6),
           ("probe", "global tokens/hue", ">=", 0.6)]


def parse_overrides(items) -> dict:
    """KEY=VALUE strings -> {key: value}, values read as YAML (3e-4 as a number)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        value = yaml.safe_load(text)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def model_config(mode, seed, sizes, overrides) -> SelfBootTokConfig:
    train = {"train.batch_size": sizes["batch_size"], "train.log_every": 25,
             "train.sample_every": 10**9, "train.ckpt_every": 10**9}
    return SelfBootTokConfig.preset("tiny", generator_tokens=mode, seed=seed, generators=["maskgit"],
                                    **{**train, **overrides})


def eval_sets(seed, n_test, n_probe):
    """The test images of a seed and the images the token probes train on (their own seed,
    seed + 1000, so they differ from the tokenizer's training images)."""
    return (build_dataset("synthetic", 32, n=n_test, seed=seed, split="test"),
            build_dataset("synthetic", 32, n=n_probe, seed=seed + 1000))


@torch.no_grad()
def reconstruct_paths(model, images) -> dict:
    """path -> reconstructions of `images`, and the ids, for one model."""
    out, ids = {}, []
    for x in images.split(100):
        t = model.tokenize(x)
        ids.append(t.ids)
        if model.global_mode:
            out.setdefault("full", []).append(model.decode(t.ids, t.local_1d, t.local_2d))
            out.setdefault("global", []).append(model.decode(t.ids))
        else:
            out.setdefault("baseline", []).append(model.decode(t.ids))
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(ids)


def evaluate(model, test, evaluator, probe_data, real_seam) -> dict:
    images, table = test["images"], test["table"]
    recs, ids = reconstruct_paths(model, images)
    res = {"paths": {}, "_recs": recs}
    for path, rec in recs.items():
        scores = evaluator.score(rec, table)
        res["paths"][path] = {
            "psnr": psnr(rec, images).mean().item(), "ssim": ssim(rec, images).mean().item(),
            **{f"domain_{k}": v for k, v in scores.items()},
            "seam": seam_ratio(rec, model.config.patch_size),
            "seam_over_real": seam_ratio(rec, model.config.patch_size) / real_seam}
    stats = codebook_stats(ids, model.config.vocab_size)
    res["codebook_usage"], res["codebook_perplexity"] = stats["usage"], stats["perplexity"]
    probes = {}
    for source, factors in PROBES.items():
        found = token_probes(model, probe_data["images"], probe_data["table"], images, table, factors,
                             probe=PROBE_KIND, sources=(source,))
        for factor, by_source in found.items():
            if source in by_source:
                probes[f"{source}/{factor}"] = by_source[source]["score"]
    res["probes"] = probes
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: every table in a minute")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="training seeds (at least 2 for a result; 1 for a screening run)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every model, as `selfboottok train --set`")
    ap.add_argument("--tag", default="", help="a name for this variant, written into the report")
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("STAGE1", "STAGE2"),
                    help="step budget for screening runs (default 2000 1000); stage 2 = 0 "
                         "evaluates the stage-1 model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None, help="keep trained models here (and reuse them)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    sizes = dict(SIZES["smoke" if args.smoke else "full"])
    if args.steps:
        if args.steps[0] < 1 or args.steps[1] < 0:
            ap.error("--steps needs STAGE1 >= 1 and STAGE2 >= 0")
        sizes["stage1_steps"], sizes["stage2_steps"] = args.steps
    try:
        overrides = parse_overrides(args.set)
        model_config("global", 0, sizes, overrides)
    except ValueError as exc:
        ap.error(str(exc))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="quality-") if args.work is None else None
    work = Path(tmp.name if tmp else args.work)
    try:
        res = run(args, sizes, overrides, work, out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    log(f"done in {res['wall_s'] / 60:.1f} min; report in {res['report']}")
    return res


def run(args, sizes, overrides, work, out) -> dict:
    seeds = list(dict.fromkeys(args.seeds))
    machine = machine_name("cpu")
    log("domain evaluator (trained once, then cached)")
    evaluator = domain_evaluator("synthetic", 32, recipe=sizes["evaluator"])
    res = {"sizes": {k: v for k, v in sizes.items()}, "seeds": seeds, "modes": args.modes,
           "overrides": overrides, "tag": args.tag, "machine": machine, "torch": torch.__version__,
           "probe": PROBE_KIND, "evaluator": evaluator.report, "runs": {}}
    grids = {}
    for seed in seeds:
        train_set = build_dataset("synthetic", 32, n=sizes["n_train"], seed=seed)
        test_set, probe_set = eval_sets(seed, sizes["n_test"], sizes["n_probe_train"])
        test = {"images": test_set.tensors()[0].clone(), "table": test_set.factor_table()}
        probe_data = {"images": probe_set.tensors()[0].clone(), "table": probe_set.factor_table()}
        real_seam = seam_ratio(test["images"], 4)
        res.setdefault("real_seam", {})[str(seed)] = real_seam
        for mode in args.modes:
            cfg = model_config(mode, seed, sizes, overrides)
            where = work / mode / f"seed{seed}"
            log(f"{MODES[mode]} / seed {seed}: stage 1 ({sizes['stage1_steps']} steps), "
                f"stage-2 decoder job ({sizes['stage2_steps']} steps)")
            s1 = train_cached("stage1", cfg, where / "stage1", train_set, "synthetic", sizes["stage1_steps"])
            s2 = s1
            if sizes["stage2_steps"]:
                s2 = train_cached("stage2", cfg, where / "stage2", train_set, "synthetic",
                                  sizes["stage2_steps"], init=s1, parts=["bootstrap"])
            log("  evaluating")
            r = evaluate(SelfBootTok.from_pretrained(s2), test, evaluator, probe_data, real_seam)
            if seed == seeds[0]:
                grids.update({path: rec[:10] for path, rec in r.pop("_recs").items()})
                grids["input"] = test["images"][:10]
            r.pop("_recs", None)
            res["runs"].setdefault(mode, {})[str(seed)] = r
    res["wall_s"] = elapsed()
    stem = f"quality-{machine_slug(machine)}"
    rows = [grids[k] for k in ("input", "full", "global", "baseline") if k in grids]
    save_grid(rows, out / f"{stem}.png", scale=4)
    res["grid"] = f"{stem}.png"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    res["report"] = out / f"{stem}.md"
    res["report"].write_text(report(res))
    return res


def _path_values(res, path, key):
    mode = "all" if path == "baseline" else "global"
    return [r["paths"][path].get(key) for r in res["runs"].get(mode, {}).values() if path in r["paths"]]


def _probe_values(res, mode, key):
    return [r["probes"].get(key) for r in res["runs"].get(mode, {}).values()]


def report(res) -> str:
    sz = res["sizes"]
    lines = [f"# Tokenizer quality{' (' + res['tag'] + ')' if res['tag'] else ''}", "",
             f"Machine: {res['machine']}; torch {res['torch']}. Tiny preset on the synthetic set "
             f"({sz['n_train']} training images per seed), stage 1 for {sz['stage1_steps']} steps at "
             f"batch {sz['batch_size']}, then the stage-2 decoder job for {sz['stage2_steps']} steps; "
             f"seeds {res['seeds']}; mean ± standard deviation over seeds, {sz['n_test']} test images "
             f"per seed. Config overrides: `{json.dumps(res['overrides'])}`. Wall time "
             f"{res['wall_s'] / 60:.1f} min.", ""]
    if len(res["seeds"]) < 2:
        lines += ["**One seed: a screening run, without a spread.**", ""]
    ev = res["evaluator"]["test_scores"]
    lines += [f"Domain evaluator on real test images: class {ev['label']:.3f}, texture kind "
              f"{ev.get('texture', float('nan')):.3f}, R² pos_x {ev.get('pos_x', float('nan')):.3f}, "
              f"hue {ev.get('hue', float('nan')):.3f}. Seam ratio of the real test images: "
              f"{fmt(list(res['real_seam'].values()), 3)}.", ""]
    paths = [p for p in PATHS if _path_values(res, p, "psnr")]
    keys = [("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("domain_label", "class acc.", 3),
            ("domain_texture", "texture acc.", 3), ("domain_pos_x", "R² pos_x", 3),
            ("domain_pos_y", "R² pos_y", 3), ("domain_hue", "R² hue", 3), ("domain_size", "R² size", 3),
            ("seam_over_real", "seam / real", 2)]
    lines += ["## Reconstructions", "", "| path | " + " | ".join(k[1] for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for p in paths:
        lines.append(f"| {PATHS[p]} | " + " | ".join(fmt(_path_values(res, p, k), d) for k, _, d in keys) + " |")
    lines += ["", f"![reconstructions]({res['grid']})", "",
              "Rows: input, " + ", ".join(PATHS[p] for p in ("full", "global", "baseline") if p in paths) + ".", ""]
    lines += ["## What the tokens carry", "",
              f"Probes with one hidden layer (256 units) trained on the tokens of {sz['n_probe_train']} "
              "training images, scored on the test images: accuracy for class and texture kind, R² "
              "for position and hue (hue as the cos and sin of its angle). In baseline mode "
              "'global tokens' are all of its quantized tokens.", "",
              "| probe | " + " | ".join(MODES[m] for m in res["modes"]) + " |", "|---|" + "---|" * len(res["modes"])]
    for source, factors in PROBES.items():
        for f in factors:
            key = f"{source}/{f}"
            lines.append(f"| {key} | " + " | ".join(fmt(_probe_values(res, m, key), 3) for m in res["modes"]) + " |")
    lines.append("| codebook use (test set) | " + " | ".join(
        fmt([r["codebook_usage"] for r in res["runs"][m].values()], 3) for m in res["modes"]) + " |")
    lines += ["", "## Targets", "", "| check | value | target | met |", "|---|---|---|---|"]
    for path, key, op, target in TARGETS:
        vals = _probe_values(res, "global", key) if path == "probe" else _path_values(res, path, key)
        m, _ = mean_std(vals)
        if m is None:
            continue
        met = m >= target if op == ">=" else m <= target
        lines.append(f"| {path} {key} | {m:.3f} | {op} {target} | {'yes' if met else 'no'} |")
    g, b = mean_std(_path_values(res, "global", "psnr"))[0], mean_std(_path_values(res, "baseline", "psnr"))[0]
    if g is not None and b is not None:
        lines.append(f"| global-only PSNR minus baseline PSNR | {g - b:+.2f} dB | >= -0.5 | "
                     f"{'yes' if g - b >= -0.5 else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
