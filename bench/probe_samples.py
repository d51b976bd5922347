"""How the class probe of `bench/quality.py` depends on how many images it is trained on.

The probe (one hidden layer of 256 units, `selfboottok.eval.probes.mlp_probe`) reads the
flattened global codes of trained models; `bench/quality.py` fits it on the tokens of 4000
training images. This script fits the same probe on the first n of a larger probe set, for
several n, and scores it on the same 1000 test images, so a reader can tell what the tokens hold
from what 4000 examples let a probe find. Models come from `bench/quality.py --work`:

    python bench/probe_samples.py --seed 0 --models selfboottok=WORK/global/seed0/stage2/model \\
        baseline=WORK/all/seed0/stage2/model --out bench/results
"""

from __future__ import annotations

import argparse

import torch

from _common import log, machine_name, write_results
from quality import eval_sets

from selfboottok import SelfBootTok
from selfboottok.eval.probes import mlp_probe, token_features


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, metavar="LABEL=DIR",
                    help="model folders (SelfBootTok.from_pretrained), each with a label")
    ap.add_argument("--seed", type=int, default=0, help="the data seed the models were trained with")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 10000, 20000],
                    help="numbers of probe training images")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    models = {}
    for item in args.models:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            ap.error(f"--models expects LABEL=DIR, got {item!r}")
        models[label] = path
    if min(args.sizes) < 10:
        ap.error(f"--sizes must be at least 10, got {min(args.sizes)}")
    torch.set_num_threads(args.threads)
    sizes = sorted(set(args.sizes))
    test, probe = eval_sets(args.seed, args.n_test, sizes[-1])
    test_y, probe_y = test.factor_table()["label"], probe.factor_table()["label"]
    res = {"machine": machine_name("cpu"), "seed": args.seed, "n_test": args.n_test, "models": models,
           "probe": "mlp_probe, one hidden layer of 256 units", "scores": {}}
    for label, path in models.items():
        model = SelfBootTok.from_pretrained(path).eval()
        train_x = token_features(model, probe.tensors()[0])["global tokens"]
        test_x = token_features(model, test.tensors()[0])["global tokens"]
        for n in sizes:
            r = mlp_probe(train_x[:n], probe_y[:n], test_x, test_y, "classification")
            res["scores"].setdefault(label, {})[str(n)] = {"score": r["score"], "steps": r["steps"]}
            log(f"{label}: n={n}: class probe {r['score']:.3f} ({r['steps']} steps)")
    table = [f"# Class probe on the global tokens against its training set size (seed {args.seed})", "",
             f"Machine: {res['machine']}. Probe: one hidden layer of 256 units, trained on the codes of "
             f"the first n images of the probe set, scored on {args.n_test} test images.", "",
             "| model | " + " | ".join(f"n = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label in models:
        table.append(f"| {label} | " + " | ".join(f"{res['scores'][label][str(n)]['score']:.3f}" for n in sizes) + " |")
    paths = write_results(args.out, "probe-samples", res["machine"], res, "\n".join(table))
    log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
