"""`selfboottok demo`: both training stages on the embedded data within a time budget, then
reconstructions, generations and a report."""

from __future__ import annotations

import json
import time
from itertools import accumulate
from pathlib import Path

import torch

from selfboottok.config import SelfBootTokConfig
from selfboottok.data import CLASS_NAMES, TEXTURE_NAMES, build_dataset
from selfboottok.eval.domain import domain_evaluator
from selfboottok.eval.flops import generator_flops
from selfboottok.eval.generation import balanced_labels, class_accuracy, class_information, sample_batches
from selfboottok.eval.metrics import psnr
from selfboottok.eval.report import save_grid
from selfboottok.pipeline import SelfBootTok
from selfboottok.training import train_stage1, train_stage2
from selfboottok.training.losses import generator_losses, stage1_losses, stage2_losses
from selfboottok.training.stages import merge_stage2, stage1_parameters, stage2_parameters

# the tiny preset, trained for a budget instead of a step count
DEMO = {"train.batch_size": 32, "train.warmup_steps": 20, "train.log_every": 10,
        "train.sample_every": 10**9, "train.ckpt_every": 10**9}
# stage 2 runs as its two jobs, one after the other: the generator's steps cost about half the
# bootstrap decoder's, and it needs many more of them to pick up the class shapes
JOBS = {"stage1": 0.55, "generator": 0.25, "bootstrap": 0.13}  # of the budget; the rest: evaluation
# a training loop's step (data loading, EMA, clipping, logging) over a bare step, measured here
LOOP_OVERHEAD = {"stage1": 1.1, "generator": 1.3, "bootstrap": 1.3}  # runs varied 1.0-1.5
GENERATOR_LR = 2e-3  # 5e-4 reached a higher loss in the same steps
# sampling: the short-trained generators need strong guidance to show their class's shape
GUIDANCE, TEMPERATURE = 4.0, 0.8
GENERATED_PER_CLASS = 20  # samples per class judged by the domain evaluator


def _timings(config, dataset, job, full_path=True) -> tuple:
    """(one-time seconds, seconds per step) of a job, from a throwaway model: the step is the
    fastest of two after a warm-up; the generator job's one-time cost tokenizes the dataset."""
    model = SelfBootTok(config).train()
    params = stage1_parameters(model) if job == "stage1" else stage2_parameters(model, (job,))
    opt = torch.optim.AdamW(params, lr=0.0)
    idx = torch.arange(config.train.batch_size) % len(dataset)
    images = torch.stack([dataset[int(i)][0] for i in idx])
    labels = torch.tensor([dataset[int(i)][1] for i in idx])
    once = 0.0
    if job == "generator":  # trains on ids tokenized once (train.cache_tokens)
        t = time.perf_counter()
        ids = model.tokenize(images).ids
        once = (time.perf_counter() - t) * len(dataset) / len(images)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        if job == "stage1":
            losses = stage1_losses(model, images, full_path)
        elif job == "generator":
            losses = generator_losses(model, ids, labels)
        else:
            losses = stage2_losses(model, images, labels, (job,))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return once, min(times[1:])


def _steps(timings, job, deadline) -> int:
    """Steps that end `job` by `deadline` (time.time()), from its timing."""
    once, per_step = timings[job]
    steps = max(20, int((deadline - time.time() - once) / per_step))
    print(f"demo: {job}: about {per_step:.3f} s/step here -> {steps} steps")
    return steps


def run_demo(out="demo_out", minutes: float = 6.0, seed: int = 0) -> dict:
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = minutes * 60
    config = SelfBootTokConfig.preset("tiny", seed=seed, **DEMO)
    train = build_dataset("synthetic", config.image_size, n=10000, seed=seed)
    test = build_dataset("synthetic", config.image_size, n=256, seed=seed, split="test")
    timings = {}
    for job in JOBS:
        once, per_step = _timings(config, train, job)
        if job == "stage1":  # the global warm-up's steps skip the full path
            w = config.train.global_warmup
            per_step = w * _timings(config, train, job, full_path=False)[1] + (1 - w) * per_step
        timings[job] = (once, per_step * LOOP_OVERHEAD[job])
    # each job ends at its share of the budget, so one job's misestimate shifts only the next
    deadline = {job: start + budget * share for job, share in zip(JOBS, accumulate(JOBS.values()))}
    s1, s2 = out / "stage1", out / "stage2"
    steps = {"stage1": _steps(timings, "stage1", deadline["stage1"])}
    train_stage1(config, s1, dataset=train, total_steps=steps["stage1"])
    steps["generator"] = _steps(timings, "generator", deadline["generator"])
    train_stage2(config.with_overrides(**{"train.lr": GENERATOR_LR}), s1 / "model", s2 / "generator",
                 parts=("generator",), dataset=train, total_steps=steps["generator"])
    steps["bootstrap"] = _steps(timings, "bootstrap", deadline["bootstrap"])
    train_stage2(None, s1 / "model", s2 / "bootstrap", parts=("bootstrap",), dataset=train,
                 total_steps=steps["bootstrap"])
    merge_stage2(s2 / "generator" / "model", s2 / "bootstrap" / "model", s2 / "model")
    model = SelfBootTok.from_pretrained(out / "stage2" / "model")
    metrics = {"steps": steps, "train_seconds": round(time.time() - start, 1)}
    metrics.update(_evaluate(model, test, out))
    metrics["generator_gflops"] = {
        "selfboottok": generator_flops(model.config) / 1e9,
        "baseline_all_tokens": generator_flops(model.config.with_overrides(generator_tokens="all")) / 1e9,
    }
    metrics["total_seconds"] = round(time.time() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(_report(metrics))
    print(f"demo: done in {metrics['total_seconds']:.0f} s; report in {out / 'report.md'}")
    return metrics


@torch.no_grad()
def _evaluate(model, test, out) -> dict:
    """PSNR and the domain evaluator's class and texture accuracy of both reconstruction paths;
    the class accuracy of each generator's samples; grids of both."""
    ev = domain_evaluator("synthetic", model.config.image_size, progress=False)
    images = torch.stack([test[i][0] for i in range(len(test))])
    table = test.factor_table()
    full, boot, ids = [], [], []
    for chunk in images.split(64):
        t = model.tokenize(chunk)
        ids.append(t.ids)
        full.append(model.decode(t.ids, t.local_1d, t.local_2d))
        boot.append(model.decode(t.ids))
    full, boot, ids = torch.cat(full), torch.cat(boot), torch.cat(ids)
    # three test images of each texture kind, in the order of TEXTURE_NAMES
    shown = torch.cat([torch.nonzero(torch.as_tensor(table["texture"]) == k)[:3, 0]
                       for k in range(len(TEXTURE_NAMES))])
    save_grid([images[shown], full[shown], boot[shown]], out / "reconstructions.png", scale=4)
    paths = {}
    for path, rec in (("full", full), ("global", boot)):
        scores = ev.score(rec, {"label": table["label"], "texture": table["texture"]})
        paths[path] = {"psnr": psnr(rec, images).mean().item(), "class_acc": scores["label"],
                       "texture_acc": scores["texture"]}
    classes = torch.arange(model.config.num_classes)
    grids, generated = {}, {}
    for kind in model.generators:
        labels = balanced_labels(GENERATED_PER_CLASS * len(classes), len(classes))
        samples = torch.cat([images for _, images, _ in sample_batches(
            model, labels, generator=kind, guidance=GUIDANCE, temperature=TEMPERATURE, batch_size=100,
            progress=False)])
        generated[kind] = class_accuracy(ev.predict(samples)["label"], labels, len(classes))
        rows = [samples[labels == c][:8] for c in classes]
        grids[kind] = f"generations_{kind}.png"
        save_grid(rows, out / grids[kind], scale=4)
    info = class_information(model, ids, torch.as_tensor(table["label"]))
    return {
        "paths": paths, "generated": generated, "generation_grids": grids,
        "class_nats_per_token": {k: v["class_nats"] for k, v in info.items()},
        "codebook_used": ids.unique().numel(), "codebook_size": model.config.vocab_size,
        "test_images": len(images), "evaluator": ev.report,
        "sampling": {"guidance": GUIDANCE, "temperature": TEMPERATURE, "per_class": GENERATED_PER_CLASS},
    }


def _report(m) -> str:
    g, p = m["generator_gflops"], m["paths"]
    real = m["evaluator"].get("test_scores", {})
    lines = [
        "# SelfBootTok demo", "",
        f"Trained on the embedded synthetic data (tiny preset, 32x32): stage 1 for "
        f"{m['steps']['stage1']} steps; stage 2 as two jobs, the generators for "
        f"{m['steps']['generator']} steps and the bootstrap + pixel decoder for "
        f"{m['steps']['bootstrap']}; {m['total_seconds']:.0f} s in all. Class and texture are "
        f"read by the domain evaluator of the synthetic set (on real test images: class "
        f"{real.get('label', float('nan')):.1%}, texture {real.get('texture', float('nan')):.1%}).", "",
        "| metric | global + true local tokens | global tokens only |", "|---|---|---|",
        f"| PSNR ({m['test_images']} test images) | {p['full']['psnr']:.2f} dB | {p['global']['psnr']:.2f} dB |",
        f"| class recognised | {p['full']['class_acc']:.1%} | {p['global']['class_acc']:.1%} |",
        f"| texture kind recognised (chance 25%) | {p['full']['texture_acc']:.1%} | "
        f"{p['global']['texture_acc']:.1%} |", "",
        "| metric | value |", "|---|---|",
        f"| codebook codes used on the test set | {m['codebook_used']} / {m['codebook_size']} |",
        *(f"| {kind}: class of its samples recognised ({m['sampling']['per_class']} per class, chance "
          f"{1 / len(CLASS_NAMES):.0%}) | {r['class_acc']:.1%} |" for kind, r in m["generated"].items()),
        *(f"| {kind}: nats per token the class label is worth (test ids, wrong label minus true) | "
          f"{v:.3f} |" for kind, v in m["class_nats_per_token"].items()),
        f"| generator GFLOPs per sample, SelfBootTok / baseline | {g['selfboottok']:.4f} / "
        f"{g['baseline_all_tokens']:.4f} ({1 - g['selfboottok'] / g['baseline_all_tokens']:.0%} less) |",
        "", "## Reconstructions", "",
        "Rows: input, reconstruction from global + local tokens, from global tokens only. Columns: "
        f"three test images each with texture {', '.join(TEXTURE_NAMES)}.", "",
        "![reconstructions](reconstructions.png)", "", "## Generations", "",
        f"One row per class, top to bottom: {', '.join(CLASS_NAMES)}. Guidance "
        f"{m['sampling']['guidance']}, temperature {m['sampling']['temperature']}.", "",
    ]
    for kind, name in m["generation_grids"].items():
        per_class = m["generated"][kind]["class_acc_per_class"]
        failing = [f"{CLASS_NAMES[c]} ({a:.0%})" for c, a in enumerate(per_class) if a is not None and a < 0.5]
        lines += [f"### {kind}", "", f"![{kind}]({name})", "",
                  "Classes recognised in fewer than half of their samples: "
                  f"{', '.join(failing) if failing else 'none'}.", ""]
    lines += ["## Training curves", "", "![stage 1](stage1/loss_curves.png)",
              "![stage 2, generators](stage2/generator/loss_curves.png)",
              "![stage 2, bootstrap decoder](stage2/bootstrap/loss_curves.png)", ""]
    return "\n".join(lines)
