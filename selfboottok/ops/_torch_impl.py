"""Pure-PyTorch references. They define the semantics every kernel backend must match."""

from __future__ import annotations

import torch

__all__ = ["sinkhorn_reference", "sinkhorn_value"]


def sinkhorn_reference(cost, a, b, eps, n_iters, tol=None, check_every=10):
    """Batched log-domain Sinkhorn. Differentiable by unrolling (the test reference).

    Convention: ``plan_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, starting from ``f = g = 0``.
    Each iteration sets ``f`` so that rows match ``a``, then ``g`` so that columns match ``b``.
    With ``tol``, a problem stops before the first iteration whose starting plan has a
    row-marginal L1 error ``<= tol``; it is checked on the device, and the host looks only every
    ``check_every`` iterations to end the loop early. Zero weights mark absent rows/columns:
    their plan entries and potentials are exactly 0.

    Returns ``(plan, f, g, n_iters int32[B], err[B])`` with ``err`` the row-marginal L1 error of
    the returned plan (columns are exact after the last update).
    """
    B, N, M = cost.shape
    row = a > 0
    col = b > 0
    neg_inf = torch.tensor(float("-inf"), dtype=cost.dtype, device=cost.device)
    log_a = torch.where(row, a.clamp_min(torch.finfo(a.dtype).tiny).log(), neg_inf)
    log_b = torch.where(col, b.clamp_min(torch.finfo(b.dtype).tiny).log(), neg_inf)
    f = cost.new_zeros(B, N)
    g = cost.new_zeros(B, M)
    done = torch.zeros(B, dtype=torch.bool, device=cost.device)
    iters = torch.zeros(B, dtype=torch.int32, device=cost.device)
    for it in range(n_iters):
        f_new = -eps * torch.logsumexp(log_b[:, None, :] + (g[:, None, :] - cost) / eps, dim=2)
        f_new = torch.where(row, f_new, 0.0)
        if tol is not None:
            with torch.no_grad():
                ratio = torch.exp((f - f_new) / eps)
                err = torch.where(row, a * (ratio - 1).abs(), 0.0).sum(-1)
                done = done | (err <= tol)
        active = ~done
        f = torch.where(active[:, None], f_new, f)
        g_new = -eps * torch.logsumexp(log_a[:, :, None] + (f[:, :, None] - cost) / eps, dim=1)
        g = torch.where(active[:, None] & col, g_new, g)
        iters = iters + active.to(torch.int32)
        if tol is not None and (it + 1) % check_every == 0 and bool(done.all()):
            break
    log_plan = log_a[:, :, None] + log_b[:, None, :] + (f[:, :, None] + g[:, None, :] - cost) / eps
    plan = torch.exp(log_plan)
    err = (plan.sum(-1) - a).abs().sum(-1)
    return plan, f, g, iters, err.detach()


def sinkhorn_value(cost, a, b, plan, f, g, eps):
    """Entropic cost ``<P,C> + eps KL(P || a⊗b)`` and linear cost ``<P,C>``, per problem.

    Uses ``log(P / (a b)) = (f + g - C) / eps``, so absent entries contribute exactly 0.
    ``KL`` is the generalised one: ``sum P log(P/Q) - sum P + sum Q``.
    """
    value_linear = (plan * cost).sum((1, 2))
    mass_q = a.sum(-1) * b.sum(-1)
    value = (
        (f * plan.sum(2)).sum(-1)
        + (g * plan.sum(1)).sum(-1)
        - eps * (plan.sum((1, 2)) - mass_q)
    )
    return value, value_linear


def attention_allowed(key_padding_mask, causal, Lq, Lk, device):
    """Bool, True where query i may see key j (or None when everything is allowed), in its
    smallest broadcast shape: ``[B,1,1,Lk]`` for a padding mask, ``[1,1,Lq,Lk]`` for causal,
    ``[B,1,Lq,Lk]`` for both. Causal is aligned bottom-right: ``j <= i + (Lk - Lq)``."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        tri = (j <= i + (Lk - Lq))[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def attention_reference(q, k, v, key_padding_mask=None, causal=False, scale=None, *,
                        upcast=True, return_lse=False):
    """Explicit ``softmax(q k^T * scale, masked) @ v`` on ``[B,H,L,D]`` tensors.

    Computed in float32 (float64 for float64 inputs); ``upcast=False`` computes in the input
    dtype instead (the low-precision baseline of the tests). Rows with no allowed key give 0,
    with zero gradients. ``return_lse`` also returns the float32/float64 log-sum-exp of the
    masked scaled scores, ``-inf`` for such rows.
    """
    Lq, D = q.shape[2:]
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype
    if upcast:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    allowed = attention_allowed(key_padding_mask, causal, Lq, Lk, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # the shift cancels in the softmax; 0 on empty rows keeps exp(-inf - m) = 0 instead of NaN
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0
    denom = torch.where(empty, 1.0, denom)  # also keeps log() and its gradient finite
    out = (p / denom) @ v.to(dtype)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.where(empty, float("-inf"), m + denom.log())[..., 0]
    return out, lse.to(lse_dtype)


def attention_backward_reference(q, k, v, key_padding_mask, causal, scale, lse, dout, delta):
    """Flash-attention backward by explicit math, from the forward's ``lse`` and
    ``delta = rowsum(dout * out) - grad_lse``: returns ``(dq, dk, dv)`` in the input dtype.

    ``P = exp(scale q k^T - lse)`` on allowed keys (0 elsewhere and on rows with ``lse = -inf``),
    ``dS = P (dout v^T - delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dout``.
    """
    c = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(c), k.to(c), v.to(c)
    Lq = q.shape[2]
    s = (qc @ kc.transpose(-1, -2)) * scale
    keep = torch.isfinite(lse)[..., None]
    allowed = attention_allowed(key_padding_mask, causal, Lq, k.shape[2], q.device)
    if allowed is not None:
        keep = keep & allowed
    p = torch.where(keep, torch.exp(s - torch.where(keep, lse.to(c)[..., None], 0.0)), 0.0)
    do = dout.to(c)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vc.transpose(-1, -2) - delta.to(c)[..., None])
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-1, -2) @ qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
