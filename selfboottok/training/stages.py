"""Stage 1 (the tokenizer) and stage 2 (generators and bootstrap decoder on frozen global
tokens), each a TrainLoop with its losses, parameters and sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from selfboottok.config import SelfBootTokConfig
from selfboottok.data.ids import IdsDataset, tokenize_dataset
from selfboottok.eval.report import save_grid
from selfboottok.pipeline import SelfBootTok

from . import distributed as dist
from .losses import PARTS, generator_losses, stage1_losses, stage2_losses
from .loop import TrainLoop


def _dataset(config, dataset):
    if dataset is not None:
        return dataset
    from selfboottok.data import build_dataset

    return build_dataset("synthetic", config.image_size, n=10000, seed=config.seed)


def _fixed_images(dataset, n=8):
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def stage1_groups(model) -> dict:
    """Everything but the generators, in clipping groups: the tokenizer (encoder, quantizer,
    pixel decoders) and the bootstrap decoder."""
    groups = {"tokenizer": list(model.tokenizer.parameters())}
    if model.global_decoder is not None:
        groups["tokenizer"] += list(model.global_decoder.parameters())
    if model.bootstrap is not None:
        groups["bootstrap"] = list(model.bootstrap.parameters())
    return groups


def stage1_parameters(model):
    return [p for ps in stage1_groups(model).values() for p in ps]


def stage2_parameters(model, parts=PARTS):
    """The parameters stage 2 trains: the generators; the bootstrap decoder (SelfBootTok mode)
    and the pixel decoders."""
    params = []
    if "generator" in parts:
        params += list(model.generators.parameters())
    if "bootstrap" in parts:
        if model.global_mode:
            params += list(model.bootstrap.parameters())
        params += list(model.tokenizer.decoder.parameters())
        if model.global_decoder is not None:
            params += list(model.global_decoder.parameters())
    return params


@torch.no_grad()
def update_teacher(model):
    """EMA step of the teacher tokenizer (when `config.ema_teacher > 0`)."""
    if model.teacher is None:
        return
    d = model.config.ema_teacher
    for t, s in zip(model.teacher.parameters(), model.tokenizer.parameters()):
        t.lerp_(s.detach(), 1 - d)


def train_stage1(config: SelfBootTokConfig, out_dir, *, dataset=None, max_steps=None,
                 resume=False, total_steps=None, device=None) -> SelfBootTok:
    """Trains the tokenizer; writes `out_dir/model` (EMA weights) for stage 2. `device`: cpu,
    cuda or cuda:N (default: a GPU when one is visible)."""
    device = dist.init(device)
    dataset = _dataset(config, dataset)
    model = SelfBootTok(config)
    shown = _fixed_images(dataset).to(device)

    def samples(m, step, out):
        rows = [shown, m.reconstruct(shown)]
        if m.global_mode:
            rows.append(m.reconstruct(shown, bootstrap=True))
        save_grid(rows, Path(out) / "samples" / f"stage1_step{step:06d}.png", scale=3)

    total = total_steps or config.train.stage1_steps
    warm = int(config.train.global_warmup * total)  # steps that train only the global path
    adversary = _adversary(config, int(config.loss.gan_start * total), device) if config.loss.gan_start < 1 else None

    def after_step(m):
        update_teacher(m)
        return adversary.discriminator_step() if adversary else None

    loop = TrainLoop(model, stage1_groups(model),
                     lambda m, b: stage1_losses(m, b[0], full_path=loop.step >= warm, adversary=adversary),
                     total, out_dir, stage="stage1",
                     max_steps=max_steps, sample_fn=samples,
                     after_step=after_step, device=device,
                     find_unused=warm > 0 and model.global_mode,  # no 2D-head gradients in the warm-up
                     extra_state={"adversary": adversary} if adversary else None)
    loop.run(dataset, resume=resume)
    _export(loop, Path(out_dir) / "model")
    return model


def train_stage2(config: Optional[SelfBootTokConfig], init, out_dir, *, parts=PARTS,
                 dataset=None, ids=None, max_steps=None, resume=False, total_steps=None,
                 device=None) -> SelfBootTok:
    """Freezes the encoder and quantizer of the stage-1 model in `init` and trains `parts`:
    the generators on the frozen ids and/or the bootstrap + pixel decoder, from one data pass.
    Two jobs (``parts=("generator",)`` and ``("bootstrap",)``) can run side by side; join
    their outputs with :func:`merge_stage2`. `ids`, instead of `dataset`: a folder written by
    `selfboottok tokenize` (`selfboottok.data.ids.write_ids`) with this tokenizer's ids, for
    the generator job. `device` as in :func:`train_stage1`."""
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    if ids is not None and (parts != ("generator",) or dataset is not None):
        raise ValueError("ids train the generators only: pass parts=('generator',) and no dataset")
    device = dist.init(device)
    base = SelfBootTok.from_pretrained(init)
    config = base.config if config is None else config
    if config.train.stage2_global_decoder:
        config = config.with_overrides(global_path_decoder=True)
    _same_tokenizer(base.config, config)
    model = SelfBootTok(config)
    model.tokenizer.load_state_dict(base.tokenizer.state_dict())
    if model.bootstrap is not None and config.bootstrap == base.config.bootstrap:
        model.bootstrap.load_state_dict(base.bootstrap.state_dict())  # else: a new (larger) one
    if model.global_decoder is not None:  # from the stage-1 model's own, or a copy of its shared one
        source = base.global_decoder if base.global_decoder is not None else base.tokenizer.decoder
        model.global_decoder.load_state_dict(source.state_dict())
    cached = ids is not None or (parts == ("generator",) and config.train.cache_tokens)
    if ids is not None:
        dataset = IdsDataset(ids, model)  # checked against this tokenizer
    else:
        dataset = _dataset(config, dataset)
    classes = torch.arange(min(10, config.num_classes)).repeat_interleave(4)
    shown = None if cached else _fixed_images(dataset).to(device)

    def samples(m, step, out):
        folder = Path(out) / "samples"
        if "generator" in parts:
            for kind in m.generators:
                imgs = m.generate(classes.to(device), generator=kind, seed=0)
                save_grid(list(imgs.split(4)), folder / f"stage2_{kind}_step{step:06d}.png", scale=3)
        if "bootstrap" in parts and m.global_mode:
            rows = [shown, m.reconstruct(shown), m.reconstruct(shown, bootstrap=True)]
            save_grid(rows, folder / f"stage2_bootstrap_step{step:06d}.png", scale=3)

    if cached and ids is None:  # ids of the frozen tokenizer, computed once (by every rank)
        dataset = tokenize_dataset(model, dataset, device, config.train.batch_size, dist.is_main())

    # a fresh discriminator, from the job's first step: the decoder it judges is trained already
    adversary = _adversary(config, 0, device) if "bootstrap" in parts else None

    def loss_fn(m, batch):
        if cached:  # batch: (ids, labels)
            return generator_losses(m, batch[0], batch[1])
        return stage2_losses(m, batch[0], batch[1], parts, adversary=adversary)

    groups = {part: stage2_parameters(model, (part,)) for part in parts}
    loop = TrainLoop(model, {k: v for k, v in groups.items() if v}, loss_fn,
                     total_steps or config.train.stage2_steps, out_dir, stage="stage2",
                     max_steps=max_steps, sample_fn=samples, device=device,
                     after_step=(lambda m: adversary.discriminator_step()) if adversary else None,
                     extra_state={"adversary": adversary} if adversary else None,
                     lrs={"bootstrap": config.train.decoder_lr} if groups.get("bootstrap") else None)
    loop.run(dataset, resume=resume)
    _export(loop, Path(out_dir) / "model")
    return model


def _adversary(config, start, device):
    """The discriminator side of `loss.gan` (None when it is off)."""
    if config.loss.gan <= 0:
        return None
    from .adversarial import Adversary

    return Adversary(config, start, device)


def merge_stage2(generator_dir, bootstrap_dir, out_dir) -> SelfBootTok:
    """One model from two stage-2 jobs: generators from one, bootstrap + pixel decoder from
    the other (both must come from the same stage-1 tokenizer)."""
    gen, boot = SelfBootTok.from_pretrained(generator_dir), SelfBootTok.from_pretrained(bootstrap_dir)
    _same_tokenizer(gen.config, boot.config)
    for a, b in zip(gen.tokenizer.encoder.parameters(), boot.tokenizer.encoder.parameters()):
        if not torch.equal(a, b):
            raise ValueError("the two stage-2 models come from different stage-1 tokenizers")
    boot.generators.load_state_dict(gen.generators.state_dict())
    boot.save_pretrained(out_dir)
    return boot


def _same_tokenizer(a: SelfBootTokConfig, b: SelfBootTokConfig):
    keep = ("train", "loss", "generator", "generators", "class_dropout", "seed", "bootstrap",
            "bootstrap_norm", "global_path_decoder",
            "w_rec", "w_rec_boot", "w_boot", "w_quant", "w_align", "ema_teacher",
            "generator_cond", "maskgit_min_mask", "guidance_schedule", "maskgit_choice_temperature")
    da = {k: v for k, v in a.to_dict().items() if k not in keep}
    db = {k: v for k, v in b.to_dict().items() if k not in keep}
    diff = sorted(k for k in da if da[k] != db.get(k))
    if diff:
        raise ValueError(f"stage 2 config differs from the stage-1 model's in {diff}")


def _export(loop, directory):
    if dist.is_main():
        with loop.ema_weights() as m:
            m.save_pretrained(directory)
    dist.barrier()
