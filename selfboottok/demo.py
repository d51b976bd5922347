"""`selfboottok demo`: both training stages on the embedded data within a time budget, then
reconstructions, generations and a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from selfboottok.config import SelfBootTokConfig
from selfboottok.data import build_dataset
from selfboottok.eval.flops import generator_flops
from selfboottok.eval.metrics import psnr
from selfboottok.eval.report import save_grid
from selfboottok.pipeline import SelfBootTok
from selfboottok.training import train_stage1, train_stage2
from selfboottok.training.stages import stage1_parameters

# the tiny preset, trained for a budget instead of a step count
DEMO = {"train.batch_size": 32, "train.warmup_steps": 20, "train.log_every": 10,
        "train.sample_every": 10**9, "train.ckpt_every": 10**9}
SHARE = {"stage1": 0.55, "stage2": 0.33}  # of the budget; the rest is evaluation


def _seconds_per_step(config, dataset, stage, full_path=True) -> float:
    """Times two steps (after one warm-up) of a throwaway model."""
    model = SelfBootTok(config).train()
    params = stage1_parameters(model) if stage == "stage1" else model.stage2_parameters()
    opt = torch.optim.AdamW(params, lr=0.0)
    idx = torch.arange(config.train.batch_size) % len(dataset)
    images = torch.stack([dataset[int(i)][0] for i in idx])
    labels = torch.tensor([dataset[int(i)][1] for i in idx])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        losses = (model.stage1_losses(images, full_path) if stage == "stage1"
                  else model.stage2_losses(images, labels))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def run_demo(out="demo_out", minutes: float = 7.0, seed: int = 0) -> dict:
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = minutes * 60
    config = SelfBootTokConfig.preset("tiny", seed=seed, **DEMO)
    train = build_dataset("synthetic", config.image_size, n=10000, seed=seed)
    test = build_dataset("synthetic", config.image_size, n=256, seed=seed, split="test")
    steps = {}
    for stage in ("stage1", "stage2"):
        per_step = _seconds_per_step(config, train, stage)
        if stage == "stage1":  # the global warm-up's steps skip the full path
            w = config.train.global_warmup
            per_step = w * _seconds_per_step(config, train, stage, full_path=False) + (1 - w) * per_step
        steps[stage] = max(20, int(SHARE[stage] * budget / per_step))
        print(f"demo: {stage}: {per_step:.2f} s/step here -> {steps[stage]} steps")
        if stage == "stage1":
            train_stage1(config, out / "stage1", dataset=train, total_steps=steps[stage])
        else:
            train_stage2(None, out / "stage1" / "model", out / "stage2", dataset=train,
                         total_steps=steps[stage])
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
    images = torch.stack([test[i][0] for i in range(len(test))])
    full, boot = [], []
    ids = []
    for chunk in images.split(64):
        t = model.tokenize(chunk)
        ids.append(t.ids)
        full.append(model.decode(t.ids, t.local_1d, t.local_2d))
        boot.append(model.decode(t.ids))
    full, boot, ids = torch.cat(full), torch.cat(boot), torch.cat(ids)
    used = ids.unique().numel()
    save_grid([images[:10], full[:10], boot[:10]], out / "reconstructions.png", scale=4)
    classes = torch.arange(model.config.num_classes).repeat_interleave(8)
    grids = {}
    for kind in model.generators:
        gen = model.generate(classes, generator=kind, guidance=1.0, seed=0)
        grids[kind] = f"generations_{kind}.png"
        save_grid(list(gen.split(8)), out / grids[kind], scale=4)
    return {
        "psnr_full": psnr(full, images).mean().item(),
        "psnr_bootstrap_only": psnr(boot, images).mean().item(),
        "codebook_used": used, "codebook_size": model.config.vocab_size,
        "test_images": len(images), "generation_grids": grids,
    }


def _report(m) -> str:
    g = m["generator_gflops"]
    lines = [
        "# SelfBootTok demo", "",
        f"Trained on the embedded synthetic data (tiny preset, 32x32): stage 1 for "
        f"{m['steps']['stage1']} steps, stage 2 for {m['steps']['stage2']} steps; "
        f"{m['total_seconds']:.0f} s in all.", "",
        "| metric | value |", "|---|---|",
        f"| PSNR, global + true local tokens ({m['test_images']} test images) | {m['psnr_full']:.2f} dB |",
        f"| PSNR, global tokens only (bootstrapped local) | {m['psnr_bootstrap_only']:.2f} dB |",
        f"| codebook codes used on the test set | {m['codebook_used']} / {m['codebook_size']} |",
        f"| generator GFLOPs per sample, SelfBootTok / baseline | {g['selfboottok']:.4f} / "
        f"{g['baseline_all_tokens']:.4f} ({1 - g['selfboottok'] / g['baseline_all_tokens']:.0%} less) |",
        "", "## Reconstructions", "",
        "Rows: input, reconstruction from global + local tokens, from global tokens only.", "",
        "![reconstructions](reconstructions.png)", "", "## Generations (one row per class)", "",
    ]
    for kind, name in m["generation_grids"].items():
        lines += [f"### {kind}", "", f"![{kind}]({name})", ""]
    lines += ["## Training curves", "", "![stage 1](stage1/loss_curves.png)",
              "![stage 2](stage2/loss_curves.png)", ""]
    return "\n".join(lines)
