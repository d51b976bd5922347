"""selfboottok.ops.sinkhorn on every backend against POT (float64) and against finite
differences / unrolled autograd for gradients."""

import subprocess
import sys

import numpy as np
import ot
import pytest
import torch

from conftest import backends_for, random_problem
from selfboottok.ops import sinkhorn
from selfboottok.ops._torch_impl import sinkhorn_reference

CPU_BACKENDS = backends_for("cpu")
# The Triton interpreter is slow: only small problems go through it.
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]
SHAPES = [(1, 5, 7), (3, 37, 13), (2, 16, 64), (3, 21, 24)]
REL_EPS = [1.0, 1e-1, 1e-2, 1e-3]


def pot_fixed_iters(cost, a, b, eps, n_iters):
    """POT's sinkhorn_log run for exactly n_iters iterations in our update order (f, then g).

    POT updates its column scaling first, so it runs on the transposed problem, warm-started
    at g = 0; its log-scalings map to ours by u = log b + g/eps, v = log a + f/eps.
    """
    C, a_, b_ = (x.numpy() for x in (cost, a, b))
    P, log = ot.bregman.sinkhorn_log(
        b_, a_, C.T, eps, numItermax=n_iters, stopThr=0.0,
        warmstart=(np.log(b_), np.zeros_like(a_)), log=True, warn=False,
    )
    f = eps * (log["log_v"] - np.log(a_))
    g = eps * (log["log_u"] - np.log(b_))
    return P.T, f, g


def scaled_eps(cost, rel):
    return float(rel * (cost.max() - cost.min()))


def check_matches_pot(gen, backend, shape, rel_eps, dtype, n_iters=60):
    cost, a, b = random_problem(gen, *shape)
    eps = scaled_eps(cost, rel_eps)
    res = sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), eps=eps, n_iters=n_iters,
                   backend=backend)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for p in range(shape[0]):
        P, f, g = pot_fixed_iters(cost[p], a[p], b[p], eps, n_iters)
        plan = res.plan[p].double().numpy()
        assert np.abs(plan - P).max() <= tol * P.max(), f"plan, problem {p}"
        # potentials live on the scale of the cost
        atol = (1e-9 if dtype == torch.float64 else 1e-5) * float(cost[p].abs().max() + 1)
        np.testing.assert_allclose(res.f[p].double().numpy(), f, atol=atol, rtol=0)
        np.testing.assert_allclose(res.g[p].double().numpy(), g, atol=atol, rtol=0)
    assert (res.n_iters == n_iters).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rel_eps", REL_EPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pot_at_fixed_iterations(gen, backend, shape, rel_eps, dtype):
    if backend == "triton" and shape[1] * shape[2] > 600:
        pytest.skip("kept small under the Triton interpreter")
    check_matches_pot(gen, backend, shape, rel_eps, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("rel_eps", [1.0, 0.1, 0.03])
def test_converged_matches_pot_solve_batch(gen, backend, uniform, rel_eps):
    cost, a, b = random_problem(gen, 4, 37, 13, uniform=uniform)
    eps = scaled_eps(cost, rel_eps)
    res = sinkhorn(cost, a, b, eps=eps, n_iters=20000, tol=1e-12, backend=backend)
    ref = ot.solve_batch(cost, reg=eps, a=a, b=b, max_iter=20000, tol=1e-13,
                         method="log_sinkhorn", reg_type="kl")
    assert (res.marginal_error <= 1e-11).all()
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-9 * ref.plan.max().item(), rtol=0)
    torch.testing.assert_close(res.value_linear, ref.value_linear, atol=1e-9, rtol=1e-9)
    # the entropic value equals the dual objective at convergence
    dual = (a * res.f).sum(-1) + (b * res.g).sum(-1)
    torch.testing.assert_close(res.value, dual, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rel_eps", [1.0, 1e-2, 1e-3])
def test_ragged_problems_match_pot_subproblems(gen, backend, rel_eps):
    N, M = (9, 6) if backend == "triton" else (37, 13)
    cost, a, b = random_problem(gen, 3, N, M, ragged=True)
    eps = scaled_eps(cost, rel_eps)
    res = sinkhorn(cost, a, b, eps=eps, n_iters=50, backend=backend)
    for name, t in res._asdict().items():
        assert torch.isfinite(t.double()).all(), name
    for p in range(3):
        rows, cols = a[p] > 0, b[p] > 0
        assert (res.plan[p][~rows] == 0).all() and (res.plan[p][:, ~cols] == 0).all()
        assert (res.f[p][~rows] == 0).all() and (res.g[p][~cols] == 0).all()
        P, f, g = pot_fixed_iters(cost[p][rows][:, cols], a[p][rows], b[p][cols], eps, 50)
        sub = res.plan[p][rows][:, cols].numpy()
        assert np.abs(sub - P).max() <= 1e-9 * P.max()
        np.testing.assert_allclose(res.f[p][rows].numpy(), f, atol=1e-8 * eps)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_eps_is_stable(gen, backend, dtype):
    # eps = 1e-3 of the cost range, with large costs: the plain scaling iteration underflows here.
    cost, a, b = random_problem(gen, 3, 64, 32)
    cost = cost * 50.0
    eps = scaled_eps(cost, 1e-3)
    res = sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), eps=eps, n_iters=300, backend=backend)
    ref = sinkhorn_reference(cost, a, b, eps, 300)
    for t in res:
        assert torch.isfinite(t.double()).all()
    # within 2x of the same-dtype reference's own error (and never looser than needed)
    same = sinkhorn_reference(cost.to(dtype), a.to(dtype), b.to(dtype), eps, 300)
    ref_err = (same[0].double() - ref[0]).abs().max()
    atol = max(2 * ref_err, (1e-10 if dtype == torch.float64 else 1e-6) * ref[0].max())
    torch.testing.assert_close(res.plan.double(), ref[0], atol=atol, rtol=0)
    torch.testing.assert_close(res.marginal_error.double(), ref[4], atol=atol * 10, rtol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tol_stops_each_problem_on_its_own(gen, backend):
    N, M = (8, 5) if backend == "triton" else (30, 20)
    cost, a, b = random_problem(gen, 3, N, M)
    cost[0] *= 0.01  # nearly uniform: converges in a few iterations
    cost[2] *= 4.0  # hardest
    # at eps = 0.3 the worst of 800 random draws took 2119 iterations: the cap is 10x that
    eps, tol = 0.3, 1e-7
    res = sinkhorn(cost, a, b, eps=eps, n_iters=20000, tol=tol, backend=backend)
    ref = sinkhorn_reference(cost, a, b, eps, 20000, tol=tol)
    assert res.n_iters[0] < res.n_iters[2]
    assert (res.marginal_error <= tol).all()
    # the stop decision may differ by one iteration where the error is within rounding of tol
    assert (res.n_iters - ref[3]).abs().max() <= 1
    torch.testing.assert_close(res.plan, ref[0], atol=1e-6 * ref[0].max().item(), rtol=0)


def test_backends_agree_with_reference_float64(gen):
    cost, a, b = random_problem(gen, 3, 21, 11, ragged=True)
    ref = sinkhorn_reference(cost, a, b, 0.02, 200)
    for backend in CPU_BACKENDS:
        res = sinkhorn(cost, a, b, eps=0.02, n_iters=200, backend=backend)
        for got, want in zip(res[:3], ref[:3]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# ---- the CPU kernel's instruction sets -------------------------------------------------------

def _cpu_isas():
    from selfboottok.ops import _backend

    ext, _ = _backend.extension()
    return ext.cpu_isas() if ext is not None else []


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request, monkeypatch):
    """Forces each code path of the cpu backend that this CPU runs (SELFBOOTTOK_CPU_ISA)."""
    monkeypatch.setenv("SELFBOOTTOK_CPU_ISA", request.param)
    return request.param


# tails: N not a multiple of 8 rows, M not a multiple of 8 or 16 lanes
ISA_SHAPES = [(2, 256, 64), (3, 37, 13), (2, 19, 40), (1, 8, 16), (2, 5, 7)]


@pytest.mark.parametrize("shape", ISA_SHAPES)
@pytest.mark.parametrize("rel_eps", [1.0, 0.05, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_isa_matches_pot(gen, cpu_isa, shape, rel_eps, dtype):
    from selfboottok.ops import _backend

    assert _backend.extension()[0].cpu_isa() == cpu_isa
    check_matches_pot(gen, "cpu", shape, rel_eps, dtype)


@pytest.mark.parametrize("tol", [None, 1e-5])
def test_cpu_isas_agree(gen, cpu_isa, tol):
    """Each path against the float64 reference at the bench's eps, float32 (stopping on tol too)."""
    cost, a, b = random_problem(gen, 4, 256, 64, uniform=True)
    cost = (cost + 1) / 3  # the bench's cost range, [0, 1)
    ref = sinkhorn_reference(cost, a, b, 0.05, 100, tol=tol)
    res = sinkhorn(cost.float(), a.float(), b.float(), eps=0.05, n_iters=100, tol=tol, backend="cpu")
    torch.testing.assert_close(res.plan.double(), ref[0], atol=2e-4 * ref[0].max().item(), rtol=0)
    assert (res.n_iters - ref[3]).abs().max() <= 1
    torch.testing.assert_close(res.value_linear.double(), (ref[0] * cost).sum((1, 2)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 9, 5), (2, 5, 17), (1, 24, 40)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_isa_gradients(gen, cpu_isa, shape, dtype):
    check_implicit_gradient(gen, "cpu", True, shape, dtype)


def test_cpu_isa_env_errors(monkeypatch):
    cost = torch.rand(1, 3, 4)
    monkeypatch.setenv("SELFBOOTTOK_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SELFBOOTTOK_CPU_ISA must be"):
        sinkhorn(cost, eps=0.1, backend="cpu")
    missing = {"generic", "avx2", "avx512"} - set(_cpu_isas())
    for name in missing:
        monkeypatch.setenv("SELFBOOTTOK_CPU_ISA", name)
        with pytest.raises(RuntimeError, match=f"no {name} code path"):
            sinkhorn(cost, eps=0.1, backend="cpu")


# ---- gradients ------------------------------------------------------------------------------

def _converged(cost, a, b, eps, backend):
    return sinkhorn(cost, a, b, eps=eps, n_iters=100000, tol=1e-15, backend=backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("which", ["value", "value_linear", "plan"])
def test_gradcheck(gen, backend, which):
    cost, a, b = random_problem(gen, 2, 6, 4, ragged=False)
    weights = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    eps = 0.3

    def fn(c):
        res = _converged(c, a, b, eps, backend)
        return (res.plan * weights).sum((1, 2)) if which == "plan" else getattr(res, which)

    torch.autograd.gradcheck(fn, (cost.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


def check_implicit_gradient(gen, backend, ragged, shape, dtype=torch.float64):
    """Ours in `dtype` against autograd through the unrolled float64 reference."""
    cost, a, b = random_problem(gen, *shape, ragged=ragged)
    weights = torch.randn(*shape, generator=gen, dtype=torch.float64)
    eps = 0.2

    c1 = cost.to(dtype, copy=True).requires_grad_()
    tol = 1e-15 if dtype == torch.float64 else 1e-7
    res = sinkhorn(c1, a.to(dtype), b.to(dtype), eps=eps, n_iters=100000, tol=tol, backend=backend)
    ((res.plan.double() * weights).sum() + res.value_linear.sum() + 0.5 * res.value.sum()).backward()

    c2 = cost.clone().requires_grad_()
    plan, f, g, _, _ = sinkhorn_reference(c2, a, b, eps, 3000)
    value_linear = (plan * c2).sum((1, 2))
    value = value_linear + eps * (
        torch.where(plan > 0, plan * torch.log(torch.where(plan > 0, plan, 1.0)
                                               / (a[:, :, None] * b[:, None, :]).clamp_min(1e-300)), 0.0)
        - plan + a[:, :, None] * b[:, None, :]
    ).sum((1, 2))
    ((plan * weights).sum() + value_linear.sum() + 0.5 * value.sum()).backward()
    if dtype == torch.float64:
        torch.testing.assert_close(c1.grad, c2.grad, atol=1e-8, rtol=1e-6)
    else:
        torch.testing.assert_close(c1.grad.double(), c2.grad, atol=2e-4 * c2.grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("shape", [(2, 9, 5), (2, 5, 9)])
def test_implicit_gradient_matches_unrolled_autograd(gen, backend, ragged, shape):
    check_implicit_gradient(gen, backend, ragged, shape)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_value_gradient_is_the_plan(gen, backend):
    cost, a, b = random_problem(gen, 3, 12, 7)
    cost.requires_grad_()
    res = sinkhorn(cost, a, b, eps=0.1, n_iters=50, backend=backend)
    res.value.sum().backward()
    torch.testing.assert_close(cost.grad, res.plan.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_shift_invariant_potential_gradients(gen, backend):
    cost, a, b = random_problem(gen, 2, 7, 5, ragged=True)
    w_f = torch.randn(2, 7, generator=gen, dtype=torch.float64) * (a > 0)
    w_g = torch.randn(2, 5, generator=gen, dtype=torch.float64) * (b > 0)
    # invariant to (f + t, g - t): equal total weight on f and g
    w_g = w_g + ((w_f.sum(-1) - w_g.sum(-1)) / (b > 0).sum(-1))[:, None] * (b > 0)

    c1 = cost.clone().requires_grad_()
    res = _converged(c1, a, b, 0.3, backend)
    ((res.f * w_f).sum() + (res.g * w_g).sum()).backward()
    c2 = cost.clone().requires_grad_()
    _, f, g, _, _ = sinkhorn_reference(c2, a, b, 0.3, 2000)
    ((f * w_f).sum() + (g * w_g).sum()).backward()
    torch.testing.assert_close(c1.grad, c2.grad, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(gen, backend):
    cost, a, b = random_problem(gen, 2, 7, 5)
    for dtype in (torch.float64, torch.float32):
        args = (cost.to(dtype).requires_grad_(), a.to(dtype), b.to(dtype), 0.1, 30, -1.0, backend)
        torch.library.opcheck(torch.ops.selfboottok.sinkhorn.default, args)
    if backend == "cpu":
        torch.library.opcheck(torch.ops.selfboottok.sinkhorn_kernel.default,
                              (cost, a, b, 0.1, 30, 1e-6))


def test_torch_compile(gen):
    cost, a, b = random_problem(gen, 2, 10, 6)

    def loss(c):
        res = sinkhorn(c, a, b, eps=0.1, n_iters=50)
        return (res.plan * c).sum() + res.value.sum()

    c1 = cost.clone().requires_grad_()
    c2 = cost.clone().requires_grad_()
    eager = loss(c1)
    eager.backward()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(c2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(c2.grad, c1.grad)


def test_unbatched_input_and_defaults(gen):
    cost = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    res = sinkhorn(cost, eps=0.1, n_iters=500, tol=1e-12)
    assert res.plan.shape == (6, 4) and res.f.shape == (6,) and res.value.shape == ()
    torch.testing.assert_close(res.plan.sum(0), torch.full((4,), 0.25, dtype=torch.float64))


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.1, n_iters=-1), "n_iters"),
        (dict(eps=0.1, tol=-1.0), "tol"),
        (dict(eps=0.1, backend="fast"), "backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.rand(2, 3, 4), **kwargs)


def test_bad_tensors():
    C = torch.rand(2, 3, 4)
    bad_cost = C.clone()
    bad_cost[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sinkhorn(bad_cost, eps=0.1)
    bad_cost[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sinkhorn(bad_cost, eps=0.1)
    with pytest.raises(ValueError, match="cost must be"):
        sinkhorn(torch.rand(3, 4, dtype=torch.float16), eps=0.1)
    with pytest.raises(ValueError, match="cost must be"):
        sinkhorn(torch.rand(2, 2, 3, 4), eps=0.1)
    with pytest.raises(ValueError, match="a must have shape"):
        sinkhorn(C, torch.full((2, 5), 0.2), eps=0.1)
    with pytest.raises(ValueError, match="dtype"):
        sinkhorn(C, torch.full((2, 3), 1 / 3, dtype=torch.float64), eps=0.1)
    with pytest.raises(ValueError, match="is on meta"):
        sinkhorn(C, torch.full((2, 3), 1 / 3, device="meta"), eps=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        sinkhorn(C, torch.tensor([[0.5, 0.6, -0.1]] * 2), eps=0.1)
    with pytest.raises(ValueError, match="equal mass"):
        sinkhorn(C, torch.full((2, 3), 0.5), eps=0.1)
    with pytest.raises(ValueError, match="positive mass"):
        sinkhorn(C, torch.zeros(2, 3), torch.zeros(2, 4), eps=0.1)
    with pytest.raises(ValueError, match="requires grad"):
        sinkhorn(C, torch.full((3,), 1 / 3, requires_grad=True), eps=0.1)


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        sinkhorn(torch.rand(1, 3, 3), eps=0.1, backend="cuda")


def test_cli_lists_backends():
    out = subprocess.run([sys.executable, "-m", "selfboottok.ops"], capture_output=True,
                         text=True, check=True).stdout
    section = out.split("sinkhorn, cpu tensors:")[1].split("\n\n")[0].split(":\n")[0]
    lines = {line.split()[0]: line.split()[1] for line in section.splitlines() if line.startswith("  ")}
    assert lines["cpu"] == "available" and lines["torch"] == "available"
