"""How sharp must a reconstruction be for the domain evaluator to read its factors?

Degrades the synthetic test images in two controlled ways and reports, for each level, the PSNR
against the real (noisy) images and the evaluator's class and texture-kind accuracy:

- a Gaussian blur of the noise-free render (sigma in pixels);
- a per-patch linear code: the images cut into 4x4 patches, each kept to its first k principal
  components (fitted on training images), i.e. the best a linear code of k numbers per patch
  can do.

It calibrates the tokenizer-quality targets: what PSNR and how many numbers per patch the texture
target needs. Deterministic; about two minutes on one core. Writes
`bench/results/evaluator-fidelity.{md,json}`.

    python bench/evaluator_fidelity.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, elapsed, log
from selfboottok.data.synthetic import SyntheticShapes, render_shapes
from selfboottok.eval.domain import domain_evaluator
from selfboottok.eval.metrics import _gaussian_window, psnr

SIGMAS = (0.4, 0.5, 0.6, 0.75, 1.0)
PCA_DIMS = (4, 8, 12, 16, 24)
PATCH = 4


def gaussian_blur(images, sigma, size=7):
    """Separable Gaussian blur with edge padding: images [B,C,S,S], sigma in pixels."""
    g = _gaussian_window(size, sigma, images.dtype, images.device)
    C, r = images.shape[1], size // 2
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def to_patches(images):
    """[B,C,S,S] -> [B * patches, C * PATCH * PATCH]."""
    cols = F.unfold(images, PATCH, stride=PATCH)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def from_patches(rows, like):
    B, _, S, _ = like.shape
    cols = rows.view(B, -1, rows.shape[1]).transpose(1, 2)
    return F.fold(cols, (S, S), PATCH, stride=PATCH)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-fit", type=int, default=5000, help="training images the PCA is fitted on")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    evaluator = domain_evaluator("synthetic", 32)
    test = SyntheticShapes(args.n_test, seed=0, split="test")
    real = test.tensors()[0]
    table = test.factor_table()
    clean = torch.from_numpy(render_shapes({k: v for k, v in table.items() if k != "noise_key"}, 32))
    rows = []

    def add(kind, level, images):
        scores = evaluator.score(images.clamp(-1, 1), table)
        rows.append({"kind": kind, "level": level, "psnr": psnr(images.clamp(-1, 1), real).mean().item(),
                     "class": scores["label"], "texture": scores["texture"]})
        log(f"{kind} {level}: {rows[-1]['psnr']:.2f} dB, class {rows[-1]['class']:.3f}, "
            f"texture {rows[-1]['texture']:.3f}")

    add("real images", "-", real)
    add("noise-free render", "-", clean)
    for s in SIGMAS:
        add("blurred render, sigma (px)", s, gaussian_blur(clean, s))
    fit = to_patches(SyntheticShapes(args.n_fit, seed=1).tensors()[0]).double()
    mean = fit.mean(0)
    basis = torch.linalg.svd(fit - mean, full_matrices=False)[2]
    x = to_patches(real).double() - mean
    for k in PCA_DIMS:
        code = x @ basis[:k].T
        add("linear code, numbers per 4x4 patch", k, from_patches((code @ basis[:k] + mean).float(), real))

    lines = ["# What the domain evaluator needs to read the factors",
             "",
             f"Synthetic test split (seed 0, {args.n_test} images), evaluator of the default recipe "
             f"(its accuracy on real test images: class {evaluator.report['test_scores']['label']:.3f}, "
             f"texture {evaluator.report['test_scores']['texture']:.3f}). PSNR is against the real "
             "(noisy) images. Written by `bench/evaluator_fidelity.py`.",
             "",
             "| degradation | level | PSNR (dB) | class | texture kind |",
             "|---|---|---|---|---|"]
    for r in rows:
        db = "—" if r["kind"] == "real images" else f"{r['psnr']:.2f}"
        lines.append(f"| {r['kind']} | {r['level']} | {db} | {r['class']:.3f} | {r['texture']:.3f} |")
    out = {"rows": rows, "n_test": args.n_test, "n_fit": args.n_fit, "evaluator": evaluator.report,
           "wall_s": elapsed()}
    Path(args.out, "evaluator-fidelity.json").write_text(json.dumps(out, indent=1))
    Path(args.out, "evaluator-fidelity.md").write_text("\n".join(lines) + "\n")
    log(f"written {args.out}/evaluator-fidelity.md")


if __name__ == "__main__":
    main()
