"""Generator FLOPs per sample, SelfBootTok (global tokens only) against the baseline (all
tokens) at the same total token budget K_g + K_l, counted on the meta device (no machine
dependence). Usage: python bench/generator_flops.py [--out bench/results/generator-flops.md]"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ROOT
from selfboottok import SelfBootTokConfig
from selfboottok.eval.flops import generator_flops


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "b64"])
    ap.add_argument("--kinds", nargs="+", default=["maskgit", "ar"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generator-flops.md"))
    args = ap.parse_args()
    lines = ["# Generator FLOPs per sample", "",
             "Forward FLOPs of one pass over the generator's token sequence (the presets' own settings), "
             "counted on the meta device by `selfboottok.eval.flops.generator_flops`; written by "
             "`bench/generator_flops.py`.", "",
             "| preset | generator | tokens (ours / baseline) | GFLOPs ours | GFLOPs baseline | ours / baseline | saving |",
             "|---|---|---|---|---|---|---|"]
    for preset in args.presets:
        for kind in args.kinds:
            ours = SelfBootTokConfig.preset(preset, generators=[kind])
            base = ours.with_overrides(generator_tokens="all")
            f_ours, f_base = generator_flops(ours, kind), generator_flops(base, kind)
            lines.append(f"| {preset} | {kind} | {ours.num_quantized} / {base.num_quantized} | "
                         f"{f_ours / 1e9:.3f} | {f_base / 1e9:.3f} | {f_ours / f_base:.3f} | "
                         f"{1 - f_ours / f_base:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)

if __name__ == "__main__":
    main()
