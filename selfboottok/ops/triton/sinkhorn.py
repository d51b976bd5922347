"""Fused batched log-domain Sinkhorn: one Triton program per problem, the whole loop in-kernel.

Semantics match ``selfboottok.ops._torch_impl.sinkhorn_reference``. The kernel works with
scaled potentials ``u = f / eps``, ``v = g / eps`` and ``K = -C / eps`` kept in registers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["sinkhorn_kernel", "fits", "MAX_TILE"]

# Largest padded tile (BLOCK_N * BLOCK_M) one program holds in registers; past ~128x128 fp32
# the compiled kernel spills (ptxas, sm_90).
MAX_TILE = 16384


def fits(N: int, M: int) -> bool:
    """Whether an N x M problem fits one program's tile."""
    return triton.next_power_of_2(N) * triton.next_power_of_2(M) <= MAX_TILE


@triton.jit
def _lse_rows(x):
    # log-sum-exp along axis 1; all -inf rows give -inf, never NaN
    m = tl.max(x, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(x - m[:, None]), 1))


@triton.jit
def _lse_cols(x):
    m = tl.max(x, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(x - m[None, :]), 0))


@triton.jit
def _sinkhorn_fwd(
    cost_ptr, a_ptr, b_ptr, scal_ptr,  # scal = [eps, tol] in the compute dtype
    plan_ptr, f_ptr, g_ptr, iters_ptr, err_ptr,
    N, M, max_iters,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_TOL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mn = rn < N
    mm = rm < M
    mask = mn[:, None] & mm[None, :]
    offs = pid * N * M + rn[:, None] * M + rm[None, :]

    eps = tl.load(scal_ptr)
    tol = tl.load(scal_ptr + 1)
    a = tl.load(a_ptr + pid * N + rn, mask=mn, other=0.0)
    b = tl.load(b_ptr + pid * M + rm, mask=mm, other=0.0)
    row = a > 0
    col = b > 0
    la = tl.where(row, tl.log(tl.where(row, a, 1.0)), float("-inf"))
    lb = tl.where(col, tl.log(tl.where(col, b, 1.0)), float("-inf"))
    K = -tl.load(cost_ptr + offs, mask=mask, other=0.0) / eps

    u = tl.zeros([BLOCK_N], dtype=K.dtype)
    v = tl.zeros([BLOCK_M], dtype=K.dtype)
    n = tl.zeros([1], dtype=tl.int32).sum(0)  # int32 scalar tensor, loop-carried
    go = n < max_iters
    while go:
        u_new = tl.where(row, -_lse_rows(K + (lb + v)[None, :]), 0.0)
        stop = n < 0  # False
        if USE_TOL:
            # row-marginal L1 error of the current plan, from the f-update
            r = tl.where(row, a * tl.abs(tl.exp(u - u_new) - 1.0), 0.0)
            stop = tl.sum(r, 0) <= tol
        # a stopping update is discarded (u and v kept)
        u = tl.where(stop, u, u_new)
        v_new = -_lse_cols(K + (la + u)[:, None])
        v = tl.where(col & (not stop), v_new, v)
        n += tl.where(stop, 0, 1)
        go = (n < max_iters) & (not stop)

    plan = tl.exp(K + (la + u)[:, None] + (lb + v)[None, :])
    tl.store(plan_ptr + offs, plan, mask=mask)
    tl.store(f_ptr + pid * N + rn, u * eps, mask=mn)
    tl.store(g_ptr + pid * M + rm, v * eps, mask=mm)
    tl.store(iters_ptr + pid, n)
    tl.store(err_ptr + pid, tl.sum(tl.abs(tl.sum(plan, 1) - a), 0))


def sinkhorn_kernel(cost, a, b, eps: float, max_iters: int, tol: float):
    """Batched Sinkhorn; ``tol < 0`` disables early stopping.

    Returns ``(plan [B,N,M], f [B,N], g [B,M], n_iters int32 [B], err [B])``.
    Raises ``ValueError`` for unsupported inputs, including tiles above ``MAX_TILE``.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, N, M], got shape {tuple(cost.shape)}")
    B, N, M = cost.shape
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cost must be float32 or float64, got {cost.dtype}")
    if a.shape != (B, N) or b.shape != (B, M):
        raise ValueError(f"a, b must be [B, N], [B, M]; got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != cost.dtype or b.dtype != cost.dtype:
        raise ValueError("cost, a and b must share a dtype")
    if a.device != cost.device or b.device != cost.device:
        raise ValueError("cost, a and b must be on the same device")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (cost.is_cuda or (interpret and cost.device.type == "cpu")):
        raise ValueError(
            f"Triton sinkhorn needs CUDA tensors (CPU only with TRITON_INTERPRET=1); got {cost.device}"
        )
    if N < 1 or M < 1:
        raise ValueError(f"N and M must be >= 1, got N={N}, M={M}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = triton.next_power_of_2(M)
    if not fits(N, M):
        raise ValueError(
            f"padded tile {BLOCK_N}x{BLOCK_M} exceeds the Triton sinkhorn limit "
            f"MAX_TILE={MAX_TILE} elements per problem"
        )

    cost, a, b = cost.contiguous(), a.contiguous(), b.contiguous()
    dev, dt = cost.device, cost.dtype
    plan = torch.empty_like(cost)
    f = torch.empty(B, N, dtype=dt, device=dev)
    g = torch.empty(B, M, dtype=dt, device=dev)
    iters = torch.empty(B, dtype=torch.int32, device=dev)
    err = torch.empty(B, dtype=dt, device=dev)
    if B == 0:
        return plan, f, g, iters, err
    # scalars go through memory so float64 problems get float64 eps/tol
    scal = torch.tensor([float(eps), float(tol)], dtype=dt, device=dev)
    # ~16 fp32 (8 fp64) tile elements per thread keeps mid-size tiles spill-free; larger ones spill
    per_warp = 512 if dt == torch.float32 else 256
    num_warps = min(16, max(4, triton.next_power_of_2(BLOCK_N * BLOCK_M // per_warp)))
    _sinkhorn_fwd[(B,)](
        cost, a, b, scal, plan, f, g, iters, err,
        N, M, int(max_iters),
        BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, USE_TOL=tol >= 0,
        num_warps=num_warps,
    )
    return plan, f, g, iters, err
