import os

import pytest
import torch

# Without a GPU, Triton kernels run (slowly) on CPU tensors in the interpreter. This must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def backends_for(device: str) -> list[str]:
    from selfboottok.ops import backend_status

    return [name for name, (ok, _) in backend_status(device).items() if ok]


@pytest.fixture
def gen():
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
