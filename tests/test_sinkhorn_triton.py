"""Triton fused Sinkhorn vs the PyTorch reference (runs under TRITON_INTERPRET=1 without a GPU)."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from selfboottok.ops._torch_impl import sinkhorn_reference  # noqa: E402
from selfboottok.ops.triton.sinkhorn import (  # noqa: E402
    MAX_TILE,
    fits,
    sinkhorn_kernel,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET != 1", allow_module_level=True)

F64 = torch.float64
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _problem(B, N, M, seed, ragged):
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 4 * torch.rand((), generator=gen, dtype=F64)
    cost = scale * torch.rand(B, N, M, generator=gen, dtype=F64)
    a = torch.rand(B, N, generator=gen, dtype=F64) + 0.05
    b = torch.rand(B, M, generator=gen, dtype=F64) + 0.05
    if ragged:
        # drop ~30% of rows/columns, keeping at least one of each
        a = a * (torch.rand(B, N, generator=gen) > 0.3)
        b = b * (torch.rand(B, M, generator=gen) > 0.3)
        a[:, 0] = a[:, 0].clamp_min(0.1)
        b[:, -1] = b[:, -1].clamp_min(0.1)
    # equal masses (1 each)
    return cost, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _row_errors(cost, a, b, eps, iters):
    """err[k, b]: row-marginal L1 error of the reference plan after k iterations."""
    return torch.stack([sinkhorn_reference(cost, a, b, eps, k)[4] for k in range(iters)])


def _pick_tol(errs, dtype):
    """A tol clearly apart from every checked error, stopping some problem as late as possible."""
    iters = errs.shape[0]
    floor = 1e-4 if dtype == torch.float32 else 1e-9
    lo, hi = max(errs.min().item(), floor), errs.max().item()
    assert lo < hi, "no usable tol range"
    cands = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 400, dtype=F64)
    margin = ((errs.flatten()[None, :] - cands[:, None]).abs() / cands[:, None]).amin(1)
    ok = margin > (1e-3 if dtype == torch.float32 else 1e-6)
    # stop iteration per problem: first k with err_k <= tol (iters if none)
    stops = torch.where(errs[None] <= cands[:, None, None], torch.arange(iters)[None, :, None], iters).amin(1)
    depth = torch.where(stops < iters, stops, -1).amax(1).clamp_max(iters // 2)
    score = torch.where(ok & (depth >= 0), depth + margin.clamp_max(0.5), -1.0)
    assert score.max() >= 0, "no tol apart from the stop errors"
    return cands[int(score.argmax())].item()


def _check(out, ref, cost, a, b, dtype):
    plan, f, g, n, err = out
    rplan, rf, rg, rn, rerr = ref
    rtol = RTOL[dtype]
    assert plan.dtype == f.dtype == g.dtype == err.dtype == dtype and n.dtype == torch.int32
    plan, f, g, err, n = plan.double().cpu(), f.double().cpu(), g.double().cpu(), err.double().cpu(), n.cpu()
    assert torch.equal(n, rn)
    assert (plan - rplan).abs().max() <= rtol * rplan.max()
    pot_scale = torch.cat([rf.abs().flatten(), rg.abs().flatten(), cost.flatten()]).max()
    assert (f - rf).abs().max() <= rtol * pot_scale
    assert (g - rg).abs().max() <= rtol * pot_scale
    err_atol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(err, rerr, rtol=100 * rtol, atol=err_atol)
    assert torch.allclose(err, (plan.sum(-1) - a).abs().sum(-1), rtol=1e-3, atol=err_atol)
    # absent rows/columns are exactly zero
    absent = (a[:, :, None] == 0) | (b[:, None, :] == 0)
    assert torch.all(plan[absent] == 0)
    assert torch.all(f[a == 0] == 0) and torch.all(g[b == 0] == 0)


SHAPES = [(1, 5, 7), (3, 37, 13), (2, 16, 64)]
EPS_REL = [1.0, 0.1, 1e-2, 1e-3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("eps_rel", EPS_REL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fixed", "tol"])
def test_matches_reference(shape, eps_rel, dtype, mode):
    B, N, M = shape
    seed = zlib.crc32(repr((shape, eps_rel, str(dtype), mode)).encode())
    cost, a, b = _problem(B, N, M, seed, ragged=B > 1)
    # round inputs to the kernel dtype so the reference sees the same problem
    cost, a, b = (t.to(dtype).double() for t in (cost, a, b))
    eps = eps_rel * (cost.max() - cost.min()).item()
    if mode == "fixed":
        iters, tol = 60, -1.0
        ref = sinkhorn_reference(cost, a, b, eps, iters)
    else:
        iters = 40
        tol = _pick_tol(_row_errors(cost, a, b, eps, iters), dtype)
        ref = sinkhorn_reference(cost, a, b, eps, iters, tol=tol)
        assert ref[3].min() < iters  # the stop rule is exercised
    out = sinkhorn_kernel(*(t.to(dtype=dtype, device=DEVICE) for t in (cost, a, b)), eps, iters, tol)
    _check(out, ref, cost, a, b, dtype)


def test_zero_iterations_and_immediate_stop():
    cost, a, b = _problem(2, 6, 3, 7, ragged=True)
    for iters, tol in [(0, -1.0), (10, 1e9)]:
        out = sinkhorn_kernel(cost.to(DEVICE), a.to(DEVICE), b.to(DEVICE), 0.3, iters, tol)
        ref = sinkhorn_reference(cost, a, b, 0.3, iters, tol=None if tol < 0 else tol)
        assert torch.equal(out[3].cpu(), torch.zeros(2, dtype=torch.int32))
        assert torch.all(out[1] == 0) and torch.all(out[2] == 0)
        _check(out, ref, cost, a, b, F64)


def test_rejects_unsupported_inputs(monkeypatch):
    assert fits(128, 128) and not fits(129, 128)
    n = 2 * int(MAX_TILE**0.5) + 1  # padded tile exceeds the limit
    big = torch.zeros(1, n, n, device=DEVICE)
    w = torch.full((1, n), 1.0 / n, device=DEVICE)
    with pytest.raises(ValueError, match="MAX_TILE"):
        sinkhorn_kernel(big, w, w, 0.1, 5, -1.0)
    cost, a, b = _problem(1, 4, 4, 0, ragged=False)
    with pytest.raises(ValueError):
        sinkhorn_kernel(cost.to(DEVICE), a.float().to(DEVICE), b.to(DEVICE), 0.1, 5, -1.0)
    with pytest.raises(ValueError):
        sinkhorn_kernel(cost.half().to(DEVICE), a.half().to(DEVICE), b.half().to(DEVICE), 0.1, 5, -1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        sinkhorn_kernel(cost, a, b, 0.1, 5, -1.0)
