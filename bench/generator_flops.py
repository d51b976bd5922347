"""Generator FLOPs per sample, SelfBootTok (global tokens only) against the baseline (all
tokens) at the same total token budget K_g + K_l. Usage: python bench/generator_flops.py"""

from __future__ import annotations

import argparse

from selfboottok import SelfBootTokConfig
from selfboottok.eval.flops import generator_flops


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "b64"])
    ap.add_argument("--kinds", nargs="+", default=["maskgit", "ar"])
    args = ap.parse_args()
    print("| preset | generator | tokens (ours / baseline) | GFLOPs ours | GFLOPs baseline | ours / baseline | saving |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for kind in args.kinds:
            ours = SelfBootTokConfig.preset(preset, generators=[kind])
            base = ours.with_overrides(generator_tokens="all")
            f_ours, f_base = generator_flops(ours, kind), generator_flops(base, kind)
            print(f"| {preset} | {kind} | {ours.num_quantized} / {base.num_quantized} | "
                  f"{f_ours / 1e9:.3f} | {f_base / 1e9:.3f} | {f_ours / f_base:.3f} | "
                  f"{1 - f_ours / f_base:.1%} |")


if __name__ == "__main__":
    main()
