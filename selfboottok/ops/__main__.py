"""`python -m selfboottok.ops`: which backends run here, and why the others do not."""

import torch

from ._backend import BACKENDS, status


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for device in devices:
        print(f"{device} tensors:")
        st = status(device)
        for name in BACKENDS:
            ok, reason = st[name]
            print(f"  {name:<7} {'available' if ok else 'unavailable':<12} {reason}")


if __name__ == "__main__":
    main()
