"""torch.distributed set-up for runs under torchrun (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Joins the process group when launched by torchrun; returns this rank's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if active():
        dist.barrier()


def mean(values: dict) -> dict:
    """Means over ranks of a dict of scalar tensors, as floats."""
    names = sorted(values)
    t = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if active():
        dist.all_reduce(t)
        t /= world()
    return dict(zip(names, t.tolist()))


def cleanup():
    if active():
        dist.destroy_process_group()
