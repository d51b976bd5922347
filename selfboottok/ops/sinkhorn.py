"""Batched entropic optimal transport: `sinkhorn`, its custom op and its implicit gradient."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import _backend
from ._torch_impl import sinkhorn_reference, sinkhorn_value

__all__ = ["sinkhorn", "SinkhornResult"]

MASS_RTOL = 1e-5


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn`; every field has a leading batch dimension ``B``."""

    plan: torch.Tensor  # [B,N,M]   plan_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)
    f: torch.Tensor  # [B,N]        row potential (0 where a == 0)
    g: torch.Tensor  # [B,M]        column potential (0 where b == 0)
    value: torch.Tensor  # [B]      <P,C> + eps KL(P || a⊗b); d value / d cost = plan
    value_linear: torch.Tensor  # [B]  <P,C>
    n_iters: torch.Tensor  # [B] int32, iterations applied per problem
    marginal_error: torch.Tensor  # [B]  || P 1 - a ||_1 (columns are exact)


def sinkhorn(cost, a=None, b=None, *, eps, n_iters=100, tol=None, backend="auto"):
    """Entropic OT for a batch of problems, in the log domain (stable down to eps ~ 1e-3 of
    the cost range).

    Args:
        cost: ``[B,N,M]`` (or ``[N,M]`` for one problem), float32 or float64.
        a, b: marginals ``[B,N]``/``[B,M]`` (or ``[N]``/``[M]``, shared); default uniform
            ``1/N``, ``1/M``. Zeros mark absent rows/columns (ragged batches); their plan
            entries and potentials are exactly 0. ``a`` and ``b`` must carry the same mass
            per problem.
        eps: entropic regularisation, > 0, in the units of ``cost``.
        n_iters: maximum iterations; one iteration is an f-update then a g-update, from
            ``f = g = 0``.
        tol: if set, each problem stops on its own (checked on the device) before the first
            iteration whose plan already has row-marginal L1 error ``<= tol``.
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"torch"``.

    Gradients flow to ``cost`` from ``plan``, ``value`` and ``value_linear`` by implicit
    differentiation at the fixed point (``d value / d cost = plan`` exactly). ``f`` and ``g``
    are defined up to a shared constant ``(f + t, g - t)``: their gradient is exact for losses
    invariant to that shift (e.g. ``<a,f> + <b,g>``) and drops the part that is not.
    """
    cost, a, b = _check(cost, a, b, eps, n_iters, tol)
    squeeze = cost.dim() == 2
    if squeeze:
        cost, a, b = cost[None], a[None], b[None]
    name = _backend.resolve(backend, cost.device, ("cuda", "triton", "cpu"))
    if name == "triton":
        from .triton.sinkhorn import MAX_TILE, fits

        if not fits(cost.shape[1], cost.shape[2]):
            if backend == "triton":
                raise ValueError(f"backend 'triton' handles N*M tiles up to {MAX_TILE} elements")
            name = "torch"  # auto only picks triton when the cuda backend is unavailable
    out = torch.ops.selfboottok.sinkhorn(
        cost, a, b, float(eps), int(n_iters), -1.0 if tol is None else float(tol), name
    )
    res = SinkhornResult(*out)
    if squeeze:
        res = SinkhornResult(*(t[0] for t in res))
    return res


def _check(cost, a, b, eps, n_iters, tol):
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be [B,N,M] or [N,M], got shape {tuple(cost.shape)}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cost must be float32 or float64, got {cost.dtype}")
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost must have N, M >= 1, got shape {tuple(cost.shape)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or not tol >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")
    batch, n, m = cost.shape[:-2], cost.shape[-2], cost.shape[-1]
    a = _marginal("a", a, batch, n, cost)
    b = _marginal("b", b, batch, m, cost)
    for name, w in (("a", a), ("b", b)):
        if w.requires_grad:
            raise ValueError(f"{name} requires grad, but sinkhorn differentiates cost only; detach it")
    return cost, a, b


def _check_values(cost, a, b, check_cost=True):
    """Data-dependent checks; they run inside the op so that torch.compile can trace around them.
    The CPU kernel checks the cost itself, in the pass that reads it anyway."""
    if check_cost and not bool(torch.isfinite(cost).all()):
        raise ValueError("cost contains NaN or Inf")
    for name, w in (("a", a), ("b", b)):
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0 (zeros mark absent entries)")
    ma, mb = a.sum(-1), b.sum(-1)
    if bool((ma <= 0).any()) or bool((mb <= 0).any()):
        raise ValueError("every problem needs a and b with positive mass")
    if not torch.allclose(ma, mb, rtol=MASS_RTOL, atol=0):
        worst = ((ma - mb).abs() / mb).max().item()
        raise ValueError(f"a and b must have equal mass per problem (relative gap {worst:.3g})")


def _marginal(name, w, batch, size, cost):
    if w is None:
        return torch.full((*batch, size), 1.0 / size, dtype=cost.dtype, device=cost.device)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if w.device != cost.device:
        raise ValueError(f"{name} is on {w.device} but cost is on {cost.device}")
    if w.dtype != cost.dtype:
        raise ValueError(f"{name} has dtype {w.dtype} but cost has {cost.dtype}")
    if w.shape == (size,):
        w = w.expand(*batch, size)
    if tuple(w.shape) != (*batch, size):
        raise ValueError(f"{name} must have shape {(*batch, size)} or {(size,)}, got {tuple(w.shape)}")
    return w.contiguous()


@functools.lru_cache(maxsize=None)
def _compiled_kernel():
    ext, reason = _backend.extension()
    if ext is None:
        raise RuntimeError(f"the compiled extension is unavailable: {reason}")

    torch.library.register_fake("selfboottok::sinkhorn_kernel")(_fake_outputs)
    return torch.ops.selfboottok.sinkhorn_kernel


def _fake_outputs(cost, a, b, eps, *_):
    B, N, M = cost.shape
    vec = cost.new_empty(B)
    return (
        torch.empty_like(cost),
        cost.new_empty(B, N),
        cost.new_empty(B, M),
        vec,
        torch.empty_like(vec),
        cost.new_empty(B, dtype=torch.int32),
        torch.empty_like(vec),
    )


def _run_kernel(cost, a, b, eps, n_iters, tol, backend):
    """(plan, f, g, value, value_linear, n_iters, err) from one backend."""
    if backend in ("cpu", "cuda"):
        return _compiled_kernel()(cost, a, b, eps, n_iters, tol)
    if backend == "triton":
        from .triton.sinkhorn import sinkhorn_kernel

        plan, f, g, iters, err = sinkhorn_kernel(cost, a, b, eps, n_iters, tol)
    else:
        plan, f, g, iters, err = sinkhorn_reference(cost, a, b, eps, n_iters, None if tol < 0 else tol)
    return (plan, f, g, *sinkhorn_value(cost, a, b, plan, f, g, eps), iters, err)


@torch.library.custom_op("selfboottok::sinkhorn", mutates_args=())
def _sinkhorn_op(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_values(cost, a, b, check_cost=backend != "cpu")
    with torch.no_grad():
        return tuple(_run_kernel(cost, a, b, eps, n_iters, tol, backend))


_sinkhorn_op.register_fake(_fake_outputs)


def _setup_context(ctx, inputs, output):
    cost, a, b, eps = inputs[:4]
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.save_for_backward(cost, a, b, output[0])


def _backward(ctx, g_plan, g_f, g_g, g_value, g_value_linear, g_iters, g_err):
    cost, a, b, plan = ctx.saved_tensors
    grad = torch.zeros_like(cost)
    if g_value is not None:
        grad = grad + g_value[:, None, None] * plan
    upstream = g_plan
    if g_value_linear is not None:
        grad = grad + g_value_linear[:, None, None] * plan
        extra = g_value_linear[:, None, None] * cost
        upstream = extra if upstream is None else upstream + extra
    if upstream is not None or g_f is not None or g_g is not None:
        grad = grad + implicit_grad(plan, a, b, ctx.eps, upstream, g_f, g_g)
    return grad, None, None, None, None, None, None


def implicit_grad(plan, a, b, eps, grad_plan=None, grad_f=None, grad_g=None):
    """d L / d cost for L(plan, f, g) at the Sinkhorn fixed point (docs/design.md, section 6.1).

    Solves the Schur complement on the smaller side in float64; the null direction (f + t,
    g - t) is lifted by a rank-one term on the support, so for f and g only the part of the
    loss invariant to that shift is differentiated.
    """
    if plan.shape[2] > plan.shape[1]:
        t = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
        return implicit_grad(t(plan), b, a, eps, t(grad_plan), grad_g, grad_f).transpose(1, 2)
    P = plan.double()
    a64, b64 = a.double(), b.double()
    G = torch.zeros_like(P) if grad_plan is None else grad_plan.double()
    GP = G * P
    r, c = GP.sum(2), GP.sum(1)
    if grad_f is not None:
        r = r + eps * torch.where(a64 > 0, grad_f.double(), 0.0)
    if grad_g is not None:
        c = c + eps * torch.where(b64 > 0, grad_g.double(), 0.0)
    inv_a = torch.where(a64 > 0, 1.0 / a64.clamp_min(1e-300), 0.0)
    support = (b64 > 0).double()
    count = support.sum(-1, keepdim=True)
    lift = (b64.sum(-1, keepdim=True) / count**2)[..., None]
    S = torch.diag_embed(b64 + (1.0 - support)) - (P * inv_a[..., None]).transpose(1, 2) @ P
    S = S + lift * support[:, :, None] * support[:, None, :]
    rhs = (-c + (P.transpose(1, 2) @ (r * inv_a)[..., None])[..., 0]) * support
    lam_g = torch.linalg.solve(S, rhs[..., None])[..., 0] * support
    lam_f = -(r + (P @ lam_g[..., None])[..., 0]) * inv_a
    out = -(P / eps) * (G + lam_f[:, :, None] + lam_g[:, None, :])
    return out.to(plan.dtype)


_sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)
