"""The CUDA attention kernels on a GPU, called as torch.ops.selfboottok.attention_{fwd,bwd}_kernel:
the checks of tests/test_attention_cuda_emu.py (float64 reference, FlashAttention's error rule,
exact zeros for rows without keys and unseen keys) on its shapes and larger ones, plus run-to-run
determinism and a grid with more than 65535 heads. Argument errors of the raw ops:
tests/test_build.py::test_raw_kernel_ops_reject_bad_arguments. Needs no POT."""

import pytest
import torch

from test_attention_cuda_emu import CASES, case_id, check_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (B, H, Lq, chunk lengths, D, mask, causal, layout)
GPU_CASES = CASES + [
    (2, 4, 1024, [1024], 128, None, True, "strided"),
    (2, 3, 777, [300, 0, 477], 64, "random", True, "strided"),
    (2, 8, 256, [513], 32, "empty_row", False, "contiguous"),
    (4, 2, 100, [1000], 72, "random", False, "misaligned"),
    (2, 2, 600, [100, 100], 40, None, True, "contiguous"),  # Lq > Lk
    (1, 2, 200, [64, 64, 64, 64], 128, "random", True, "misaligned"),
    (3, 2, 129, [129], 16, None, False, "strided"),
    (2, 2, 1, [300], 96, "random", False, "strided"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    from selfboottok.ops import _backend

    ext, why = _backend.extension()
    if ext is None:
        pytest.skip(f"no selfboottok._C: {why}")
    if not ext.cuda_compiled():
        pytest.skip("selfboottok._C was built without CUDA")
    return torch.ops.selfboottok.attention_fwd_kernel, torch.ops.selfboottok.attention_bwd_kernel


@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(ops, gen, case, dtype):
    check_case(*ops, gen, case, dtype, device="cuda")
    torch.cuda.synchronize()


def _inputs(gen, B, H, Lq, Lk, D, dtype=torch.float16):
    q, k, v, dout = (torch.randn(B, H, L, D, generator=gen).to("cuda", dtype) for L in (Lq, Lk, Lk, Lq))
    return q, k, v, dout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(ops, gen, dtype):
    fwd, bwd = ops
    q, k, v, dout = _inputs(gen, 2, 4, 300, 301, 64, dtype)
    mask = torch.rand(2, 301, generator=gen).cuda() > 0.2
    runs = []
    for _ in range(2):
        out, lse = fwd(q, [k[:, :, :100], k[:, :, 100:]], [v[:, :, :100], v[:, :, 100:]], mask, True, 0.125)
        delta = (dout.float() * out.float()).sum(-1)
        dq, dk, dv = bwd(q, [k], [v], mask, True, 0.125, out, lse, dout, delta)
        runs.append([out, lse, dq, *dk, *dv])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_more_than_65535_heads(ops, gen):
    fwd, bwd = ops
    q, k, v, dout = _inputs(gen, 1100, 64, 3, 5, 8, torch.float32)
    out, lse = fwd(q, [k], [v], None, False, 0.5)
    ref = torch.softmax((q @ k.transpose(-1, -2)) * 0.5, -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2)) * 0.5, -1))
    delta = (dout * out).sum(-1)
    dq, dk, dv = bwd(q, [k], [v], None, False, 0.5, out, lse, dout, delta)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[0]).all()
    torch.testing.assert_close(dv[0], torch.softmax((q @ k.transpose(-1, -2)) * 0.5, -1).transpose(-1, -2) @ dout,
                               atol=1e-5, rtol=1e-5)

