"""torch.distributed set-up for runs under torchrun (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device=None) -> torch.device:
    """Joins the process group when launched by torchrun; returns this rank's device: `device`
    (cpu, cuda or cuda:N; under torchrun a CUDA run takes the GPU of its LOCAL_RANK), or by
    default a GPU when one is visible."""
    want = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: torch sees no CUDA GPU")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    elif use_cuda and want is not None and want.index is not None:
        torch.cuda.set_device(want)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


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
