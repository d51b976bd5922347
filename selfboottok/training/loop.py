"""The training loop both stages share: AdamW, warmup + cosine LR, gradient clipping and
accumulation, EMA weights, bf16 autocast on GPU, DDP, checkpoints, metrics and samples."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from selfboottok.progress import Progress

from . import distributed as dist
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good state was checkpointed."""


class _Losses(nn.Module):
    """Lets DDP see the loss computation as the module's forward."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup over `warmup` steps, then cosine to 0 at `total`."""

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _Batches(torch.utils.data.Sampler):
    """Index lists for optimizer steps `start..`: epoch e is the DistributedSampler order with
    seed + e, so a resumed run reads exactly the batches an uninterrupted one would."""

    def __init__(self, sampler, micro_batch, start_batch):
        self.sampler, self.micro, self.start = sampler, micro_batch, start_batch
        self.per_epoch = len(sampler) // micro_batch
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {len(sampler)} samples per rank, fewer than one "
                             f"micro-batch of {micro_batch}")

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for j in range(skip, self.per_epoch):
                yield order[j * self.micro : (j + 1) * self.micro]
            epoch, skip = epoch + 1, 0


class TrainLoop:
    """Trains `params` of `model` on `loss_fn(model, batch) -> dict` (with a "loss" entry).
    `params` is a list of parameters, or a dict of named lists whose gradients are clipped
    each on its own (parts trained in tandem then match the same parts trained as separate
    jobs: one part's large gradients do not scale down the other's).

    Writes under `out_dir`: `metrics.jsonl` (one record per logged step, the last step always),
    `checkpoints/last.pt` (atomic), samples via `sample_fn(model, step, out_dir)` (called with
    the EMA weights in place), `loss_curves.png`. `total_steps` sets the LR schedule;
    `max_steps` stops earlier without changing it. `find_unused`: some steps leave parameters
    without gradients (DDP must look for them). `after_step(model)` runs after each optimizer
    step; a dict it returns is logged with the losses. `extra_state`: name -> an object with
    `state_dict`/`load_state_dict` (e.g. a discriminator) saved in and resumed from the
    checkpoint. `lrs`: name of a group in `params` -> its peak learning rate (default
    `train.lr`)."""

    def __init__(self, model, params, loss_fn, total_steps, out_dir, *, stage="train",
                 max_steps=None, sample_fn=None, after_step=None, device=None, find_unused=False,
                 extra_state=None, lrs=None):
        self.model, self.loss_fn, self.stage = model, loss_fn, stage
        self.extra_state = dict(extra_state or {})
        self.cfg = model.config.train
        self.total = int(total_steps)
        self.stop = self.total if max_steps is None else min(self.total, int(max_steps))
        self.out = Path(out_dir)
        self.sample_fn, self.after_step = sample_fn, after_step
        self.device = device or torch.device("cpu")
        self.clip_groups = {name: list(ps) for name, ps in
                            (params.items() if isinstance(params, dict) else [("", params)])}
        self.params = [p for ps in self.clip_groups.values() for p in ps]
        model.to(self.device)
        model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        lrs = dict(lrs or {})
        if set(lrs) - set(self.clip_groups):
            raise ValueError(f"lrs names groups {sorted(set(lrs) - set(self.clip_groups))} "
                             f"that are not in params ({sorted(self.clip_groups)})")
        # one lr for all (the checkpoints' optimizer layout before `lrs`), or one per named group
        by_lr = [(self.params, self.cfg.lr)] if not lrs else [
            (ps, lrs.get(name, self.cfg.lr)) for name, ps in self.clip_groups.items()]
        groups = []
        for ps, lr in by_lr:
            groups += [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": self.cfg.weight_decay, "lr": lr},
                       {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(self.cfg.warmup_steps, self.total))
        self.ema = [p.detach().clone().float() for p in self.params]
        self.step = 0
        wrapped = _Losses(model, loss_fn)
        if dist.active():
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(
                wrapped, device_ids=ids, find_unused_parameters=find_unused)
        self.wrapped = wrapped

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    # state
    def state(self) -> dict:
        return {"stage": self.stage, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema": self.ema, "rng": rng_state(), "config": self.model.config.to_dict(),
                "extra": {k: v.state_dict() for k, v in self.extra_state.items()}}

    def save(self):
        if dist.is_main():
            save_checkpoint(self.ckpt_path, **self.state())
        dist.barrier()

    def resume(self, path=None):
        state = load_checkpoint(path or self.ckpt_path, map_location=self.device)
        if state["stage"] != self.stage:
            raise ValueError(f"checkpoint is from {state['stage']}, not {self.stage}")
        if state["config"] != self.model.config.to_dict():
            raise ValueError("checkpoint was written with a different config; pass the same "
                             "--preset/--config/--set as the run being resumed")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        for e, saved in zip(self.ema, state["ema"]):
            e.copy_(saved)
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra"][name])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones, restored on exit."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    # the loop
    def run(self, dataset, resume=False) -> dict:
        if resume:
            self.resume()
        else:
            seed_everything(self.model.config.seed + dist.rank())
        world, accum = dist.world(), max(1, self.cfg.grad_accum)
        if self.cfg.batch_size % (world * accum):
            raise ValueError(f"train.batch_size ({self.cfg.batch_size}) must be divisible by "
                             f"world size x grad_accum ({world} x {accum})")
        micro = self.cfg.batch_size // (world * accum)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True,
                                     seed=self.model.config.seed, drop_last=True)
        loader = DataLoader(dataset, batch_sampler=_Batches(sampler, micro, self.step * accum),
                            num_workers=self.cfg.num_workers)
        batches = iter(loader)
        metrics_path = self.out / "metrics.jsonl"
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume and metrics_path.exists():
                metrics_path.unlink()
        bar = Progress(self.stop, self.stage, initial=self.step, unit="step", enabled=dist.is_main())
        last = {}
        t0 = time.time()
        while self.step < self.stop:
            losses = self._one_step(batches, accum)
            self.step += 1
            log_now = self.step % self.cfg.log_every == 0 or self.step == self.stop
            if log_now:
                last = {"step": self.step, "lr": self.sched.get_last_lr()[0],
                        "time": round(time.time() - t0, 2), **dist.mean(losses), **_gpu_stats()}
                bar.set_postfix({k: v for k, v in last.items() if k in losses})
                if dist.is_main():
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
            bar.update(1)
            if self.sample_fn and (self.step % self.cfg.sample_every == 0 or self.step == self.stop):
                if dist.is_main():
                    with self.ema_weights() as m, torch.no_grad():
                        was = m.training
                        self.sample_fn(m.eval(), self.step, self.out)
                        m.train(was)
                dist.barrier()
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.stop:
                self.save()
        bar.close()
        if dist.is_main() and metrics_path.exists():
            from selfboottok.eval.report import plot_curves

            plot_curves(metrics_path, self.out / "loss_curves.png", title=self.stage)
        return last

    def _one_step(self, batches, accum) -> dict:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        totals = {}
        for i in range(accum):
            batch = [t.to(self.device, non_blocking=True) for t in next(batches)]
            sync = contextlib.nullcontext()
            if i < accum - 1 and isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
                sync = self.wrapped.no_sync()
            with sync, _autocast(self.device):
                losses = self.wrapped(batch)
            loss = losses["loss"]
            if not _all_finite(loss):
                self.save()  # the state before this step: the last good one
                raise TrainingDiverged(
                    f"{self.stage}: loss is {loss.item()} at step {self.step + 1}; stopped, the "
                    f"last good state (step {self.step}) is in {self.ckpt_path}")
            with sync:
                (loss / accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / accum
        norms = {}
        for name, ps in self.clip_groups.items():
            norms[name] = torch.nn.utils.clip_grad_norm_(ps, self.cfg.grad_clip).detach().float()
            if name:
                totals[f"grad_norm_{name}"] = norms[name]
        totals["grad_norm"] = torch.stack(list(norms.values())).square().sum().sqrt()
        self.opt.step()
        self.sched.step()
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - decay)
        if self.after_step:
            totals.update(self.after_step(self.model) or {})
        return totals


def seed_everything(seed: int):
    """torch (CPU and CUDA), numpy and python RNGs: a run's random draws follow its seed."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_finite(loss) -> bool:
    bad = (~torch.isfinite(loss.detach())).float().reshape(())
    if dist.active():
        torch.distributed.all_reduce(bad)
    return bad.item() == 0


def _gpu_stats() -> dict:
    """GPU memory and utilisation through nvidia-ml-py, when there is a GPU."""
    if not torch.cuda.is_available():
        return {}
    out = {"gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        out["gpu_util"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    except Exception:  # nvidia-ml-py missing or no NVML: memory only
        pass
    return out
