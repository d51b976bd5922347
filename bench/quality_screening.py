"""One table of many `bench/quality.py` runs: the screening of tokenizer changes, each run a
variant (its tag and config overrides) at the same step budget.

    python bench/quality_screening.py runs/quality/*/quality-*.json --out docs/results/tokenizer-screening.md

Copies each run's JSON into `bench/results/quality-screening/<tag>.json` (so the table's figures
come from committed files) and writes the table, one row per run and path, in the order given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from _common import ROOT, mean_std

COLUMNS = [("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("domain_label", "class", 3),
           ("domain_texture", "texture", 3), ("seam_over_real", "seam/real", 2)]
PROBES = [("global tokens/label", "probe class", 3), ("global tokens/pos_x", "probe x", 2),
          ("global tokens/hue", "probe hue", 2), ("local tokens/texture", "probe texture", 3)]


def _cell(values, digits):
    m, s = mean_std(values)
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(values) > 1 else "")


def rows(res) -> list:
    out = []
    for mode, by_seed in res["runs"].items():
        paths = sorted({p for r in by_seed.values() for p in r["paths"]}, key=["full", "global", "baseline"].index)
        for path in paths:
            cells = [_cell([r["paths"][path][k] for r in by_seed.values()], d) for k, _, d in COLUMNS]
            probes = [_cell([r["probes"].get(k) for r in by_seed.values() if k in r["probes"]], d)
                      for k, _, d in PROBES]
            out.append((path, cells, probes))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="quality-*.json files of bench/quality.py runs")
    ap.add_argument("--out", required=True, help="the markdown table to write")
    ap.add_argument("--title", default="Tokenizer screening runs")
    args = ap.parse_args(argv)
    store = ROOT / "bench" / "results" / "quality-screening"
    store.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    header = (["run", "overrides", "steps", "seeds", "path"] + [c[1] for c in COLUMNS]
              + [p[1] for p in PROBES])
    lines = [f"# {args.title}", "",
             "Each row: `bench/quality.py` on the tiny preset and the synthetic set, the given stage-1 / "
             "stage-2 steps at batch 32, the given training seeds; 1000 test images per seed. Paths: "
             "full = global + true local tokens, global = global tokens only (bootstrapped local), "
             "baseline = all tokens quantized. class/texture: the domain evaluator's accuracy on the "
             "reconstructions; seam/real: the patch-seam ratio over the real images'; probes: one "
             "hidden layer on the tokens (class accuracy, R² of pos_x and hue; texture kind from the "
             "local tokens). With one seed there is no spread: a screening run. The raw results are "
             "linked in the first column.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in args.results:
        res = json.loads(Path(path).read_text())
        tag = res["tag"] or Path(path).parent.name
        kept = store / f"{tag}.json"
        if Path(path).resolve() != kept.resolve():
            shutil.copyfile(path, kept)
        link = os.path.relpath(kept, out.parent.resolve())
        over = ", ".join(f"{k}={v}" for k, v in res["overrides"].items()) or "(defaults)"
        steps = f"{res['sizes']['stage1_steps']} / {res['sizes']['stage2_steps']}"
        for p, cells, probes in rows(res):
            lines.append(f"| [{tag}]({link}) | {over} | {steps} | {len(res['seeds'])} | {p} | "
                         + " | ".join(cells + probes) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(args.results)} runs)")


if __name__ == "__main__":
    main()
