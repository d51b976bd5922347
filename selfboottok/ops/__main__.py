"""`python -m selfboottok.ops`: which backends run here for each op and why the others do not,
the CPU Sinkhorn kernel's instruction set, and what attention's `auto` picks on a GPU, and why."""

import os

import torch

from . import _attention_auto, _backend
from .attention import status as attention_status


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for op, op_status in (("sinkhorn", _backend.status), ("attention", attention_status)):
        for device in devices:
            print(f"{op}, {device} tensors:")
            for name, (ok, reason) in op_status(device).items():
                print(f"  {name:<7} {'available' if ok else 'unavailable':<12} {reason}")
    print(f"sinkhorn cpu backend: {cpu_isa_line()}")
    print("attention, auto on cpu tensors: sdpa")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    where = f"on this GPU ({gpu})" if gpu else "(no GPU here; the table's GPUs shown)"
    print(f"attention, auto on cuda tensors {where}:")
    for line in _attention_auto.report(gpu):
        print(f"  {line}")


def cpu_isa_line() -> str:
    ext, why = _backend.extension()
    if ext is None:
        return f"unavailable ({why})"
    forced = os.environ.get("SELFBOOTTOK_CPU_ISA")
    how = f"SELFBOOTTOK_CPU_ISA={forced}" if forced else "the best this CPU runs"
    try:
        isa = ext.cpu_isa()
    except (ValueError, RuntimeError) as exc:
        isa = f"none: {exc}"
    return f"instruction set {isa} ({how}; this CPU runs {', '.join(ext.cpu_isas())})"


if __name__ == "__main__":
    main()
