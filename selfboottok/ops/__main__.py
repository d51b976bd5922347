"""`python -m selfboottok.ops`: which backends run here for each op, and why the others do not."""

import torch

from ._backend import BACKENDS, status
from .attention import status as attention_status


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for op, op_status in (("sinkhorn", status), ("attention", attention_status)):
        for device in devices:
            print(f"{op}, {device} tensors:")
            st = op_status(device)
            for name in BACKENDS:
                ok, reason = st[name]
                print(f"  {name:<7} {'available' if ok else 'unavailable':<12} {reason}")


if __name__ == "__main__":
    main()
