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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: on a shared, oversubscribed CPU every multithreaded op
    can wait a time slice for its second thread, so small batches run many times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_problem(gen, B, N, M, dtype=torch.float64, ragged=False, uniform=False):
    cost = torch.rand(B, N, M, generator=gen, dtype=dtype) * 3.0 - 1.0
    if uniform:
        a = torch.full((B, N), 1.0 / N, dtype=dtype)
        b = torch.full((B, M), 1.0 / M, dtype=dtype)
    else:
        a = torch.rand(B, N, generator=gen, dtype=dtype) + 0.2
        b = torch.rand(B, M, generator=gen, dtype=dtype) + 0.2
    if ragged:
        for p in range(B):
            a[p, torch.randperm(N, generator=gen)[: N // 3]] = 0
            b[p, torch.randperm(M, generator=gen)[: M // 4]] = 0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return cost, a, b
