"""Fused scaled-dot-product attention: `attention`, its custom op, and `MultiheadAttention`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _backend
from ._torch_impl import attention_allowed, attention_backward_reference, attention_reference

__all__ = ["attention", "MultiheadAttention", "status"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 128
MAX_CHUNKS = 4
KERNELS = ("cuda", "triton")


def attention(q, k, v, *, key_padding_mask=None, causal=False, scale=None, backend="auto"):
    """``softmax(q k^T * scale) @ v`` per batch and head, with masking.

    Args:
        q: ``[B,H,Lq,D]``; ``D <= 128`` and a multiple of 8. float32/float16/bfloat16
            (float64 for references and tests: served by the ``cpu`` and ``torch`` backends).
        k, v: ``[B,H,Lk,D]``, or equal-length lists/tuples of up to 4 chunks ``[B,H,Lk_i,D]``
            read as their concatenation along the sequence. The ``cuda`` and ``triton`` kernels
            read the chunks in place (no copy); ``cpu`` and ``torch`` concatenate them. Any
            strides with a contiguous last dim are read as they are. Same dtype and device as q.
        key_padding_mask: bool ``[B,Lk]``, True for a real key.
        causal: query ``i`` may attend key ``j`` iff ``j <= i + (Lk - Lq)``: the diagonal is
            aligned bottom-right (FlashAttention convention), so the last query sees every key.
        scale: multiplies the scores; default ``1/sqrt(D)``.
        backend: ``"auto"`` (cuda, then triton on GPU tensors; cpu on CPU tensors) | ``"cuda"`` |
            ``"triton"`` | ``"cpu"`` (PyTorch's SDPA) | ``"torch"`` (the explicit reference).

    A query row with no allowed key returns zeros, and its gradients are zero.
    Returns ``[B,H,Lq,D]`` in the dtype of ``q``.
    """
    q, k, v, key_padding_mask, scale = _check(q, k, v, key_padding_mask, causal, scale)
    avail = status(q.device.type)
    if q.dtype == torch.float64:
        for name in KERNELS:
            avail[name] = (False, "the kernels take float32, float16 and bfloat16, not float64")
    name = _backend.resolve(backend, q.device, KERNELS + ("cpu",), avail)
    out, _ = torch.ops.selfboottok.attention(q, k, v, key_padding_mask, bool(causal), scale, name)
    return out


def _check(q, k, v, key_padding_mask, causal, scale):
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B,H,Lq,D], got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    B, H, Lq, D = q.shape
    if D > MAX_HEAD_DIM or D % 8 != 0:
        raise ValueError(f"head dim D must be a multiple of 8 and <= {MAX_HEAD_DIM}, got D={D}")
    if min(B, H, Lq) == 0:
        raise ValueError(f"q must have B, H, Lq >= 1, got shape {tuple(q.shape)}")
    k = _chunks("k", k, q)
    v = _chunks("v", v, q)
    if len(k) != len(v) or any(a.shape[2] != b.shape[2] for a, b in zip(k, v)):
        raise ValueError(
            f"k and v must have the same chunk lengths, got {[c.shape[2] for c in k]} "
            f"and {[c.shape[2] for c in v]}"
        )
    Lk = sum(c.shape[2] for c in k)
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor [B,Lk], got {got}")
        if tuple(m.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape {(B, Lk)}, got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask is on {m.device} but q is on {q.device}")
        key_padding_mask = m.contiguous()
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    return _lastdim_contiguous(q), k, v, key_padding_mask, float(scale)


def _chunks(name, x, q):
    chunks = list(x) if isinstance(x, (list, tuple)) else [x]
    if not chunks:
        raise ValueError(f"{name} must be a tensor or a non-empty list of chunks")
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"{name} may have at most {MAX_CHUNKS} chunks, got {len(chunks)}")
    B, H, _, D = q.shape
    for i, c in enumerate(chunks):
        what = name if isinstance(x, torch.Tensor) else f"{name}[{i}]"
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != 4 or (c.shape[0], c.shape[1], c.shape[3]) != (B, H, D):
            raise ValueError(f"{what} must be [{B},{H},Lk,{D}] to match q, got {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"{what} has dtype {c.dtype} but q has {q.dtype}")
        if c.device != q.device:
            raise ValueError(f"{what} is on {c.device} but q is on {q.device}")
    if sum(c.shape[2] for c in chunks) == 0:
        raise ValueError(f"{name} must have Lk >= 1 keys in total")
    return [_lastdim_contiguous(c) for c in chunks]


def _lastdim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def status(device_type: str = "cpu") -> dict[str, tuple[bool, str]]:
    """backend -> (available for attention on `device_type` tensors, reason). The `cpu`
    backend is PyTorch's SDPA, so unlike the other ops it needs no compiled extension."""
    out = {}
    ext, why = _backend.extension()
    if device_type != "cuda":
        out["cuda"] = (False, "tensors are not on a CUDA device")
    elif ext is None:
        out["cuda"] = (False, why)
    elif not ext.cuda_compiled() or not hasattr(torch.ops.selfboottok, "attention_fwd_kernel"):
        out["cuda"] = (False, "selfboottok._C was built without the CUDA attention kernels")
    elif not torch.cuda.is_available():
        out["cuda"] = (False, "no CUDA device")
    else:
        out["cuda"] = (True, "CUDA kernels in selfboottok._C")
    out["triton"] = _backend._triton_status(device_type)
    if device_type == "cpu":
        out["cpu"] = (True, "torch scaled_dot_product_attention on CPU")
    else:
        out["cpu"] = (False, "tensors are not on the CPU")
    out["torch"] = (True, "pure-PyTorch reference")
    return out


def _lse_dtype(dtype):
    # float64 inputs keep a float64 lse so the backward matches the float64 reference
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cat(chunks):
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def _sdpa_bias(q, k, key_padding_mask, causal):
    """PyTorch's CPU flash kernel takes masks as an additive bias in q's dtype; also returns
    the rows that see no key (which that kernel leaves at lse = 0)."""
    B, _, Lq, _ = q.shape
    allowed = attention_allowed(key_padding_mask, causal, B, Lq, k.shape[2], q.device)
    if allowed is None:
        return None, None
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    return bias, ~allowed.any(-1)


def _sdpa_cpu(q, k, v, key_padding_mask, causal, scale):
    bias, empty = _sdpa_bias(q, k, key_padding_mask, causal)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def _sdpa_cpu_backward(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta):
    bias, _ = _sdpa_bias(q, k, key_padding_mask, causal)
    # lse = 0 on empty rows: their scores are all -inf, so P = 0 there
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, finite_lse, 0.0, False, attn_mask=bias, scale=scale
    )
    # PyTorch's kernel forms delta = rowsum(dout * out) itself; a gradient of lse adds
    # P * (that - delta), done by explicit math only when it is not zero
    extra = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1) - delta
    if bool(extra.any()):
        eq, ek, _ = attention_backward_reference(
            q, k, v, key_padding_mask, causal, scale, lse, torch.zeros_like(dout), -extra
        )
        dq, dk = dq + eq, dk + ek
    return dq, dk, dv


@torch.library.custom_op("selfboottok::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out, lse): lse is the float32 (float64 for float64 inputs) natural-log
    log-sum-exp of the allowed scaled scores, -inf on rows with no allowed key."""
    with torch.no_grad():
        if backend == "cuda":
            out, lse = torch.ops.selfboottok.attention_fwd_kernel(
                q, k, v, key_padding_mask, causal, scale
            )
        elif backend == "triton":
            from .triton.attention import attention_fwd

            out, lse = attention_fwd(q, k, v, key_padding_mask, causal, scale)
        elif backend == "cpu":
            out, lse = _sdpa_cpu(q, _cat(k), _cat(v), key_padding_mask, causal, scale)
        else:
            out, lse = attention_reference(
                q, _cat(k), _cat(v), key_padding_mask, causal, scale, return_lse=True
            )
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@_attention_op.register_fake
def _fake(q, k, v, key_padding_mask, causal, scale, backend):
    B, H, Lq, D = q.shape
    return q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("selfboottok::attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    delta: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> (dq, dk chunks, dv chunks), given ``delta = rowsum(dout * out) - grad_lse``."""
    with torch.no_grad():
        if backend == "cuda":
            dq, dk, dv = torch.ops.selfboottok.attention_bwd_kernel(
                q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta
            )
        elif backend == "triton":
            from .triton.attention import attention_bwd

            dq, dk, dv = attention_bwd(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta)
        else:
            kc, vc = _cat(k), _cat(v)
            if backend == "cpu":
                dq, dk, dv = _sdpa_cpu_backward(
                    q, kc, vc, key_padding_mask, causal, scale, out, lse, dout, delta
                )
            else:
                dq, dk, dv = attention_backward_reference(
                    q, kc, vc, key_padding_mask, causal, scale, lse, dout, delta
                )
            sizes = [c.shape[2] for c in k]
            dk, dv = dk.split(sizes, dim=2), dv.split(sizes, dim=2)
    return dq.contiguous(), [t.contiguous() for t in dk], [t.contiguous() for t in dv]


@_attention_backward_op.register_fake
def _fake_backward(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta, backend):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        [torch.empty_like(c, memory_format=torch.contiguous_format) for c in k],
        [torch.empty_like(c, memory_format=torch.contiguous_format) for c in v],
    )


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.causal, ctx.scale, ctx.backend, ctx.n_chunks = causal, scale, backend, len(k)
    ctx.save_for_backward(q, key_padding_mask, *output, *k, *v)


def _backward(ctx, g_out, g_lse):
    q, key_padding_mask, out, lse, *kv = ctx.saved_tensors
    k, v = kv[: ctx.n_chunks], kv[ctx.n_chunks :]
    dout = torch.zeros_like(out) if g_out is None else _lastdim_contiguous(g_out.to(q.dtype))
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    if g_lse is not None:
        delta = delta - g_lse.to(lse.dtype)
    dq, dk, dv = torch.ops.selfboottok.attention_backward(
        q, k, v, key_padding_mask, ctx.causal, ctx.scale, out, lse, dout, delta.contiguous(),
        ctx.backend,
    )
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class MultiheadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with q/k/v/out projections over :func:`attention`.

    ``kv_dim`` is the feature size of ``context`` for cross-attention (default ``dim``).
    """

    def __init__(self, dim, num_heads, qkv_bias=True, kv_dim=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, key_padding_mask=None, causal=False, cache=None):
        """x ``[B,L,dim]``; context ``[B,Lk,kv_dim]`` or a list of such chunks (default x);
        key_padding_mask bool ``[B,Lk]``. `cache` (incremental decoding): an object whose
        ``append(k, v)`` stores this call's key and value chunks and returns all those stored so
        far, which are attended to instead. Returns ``[B,L,dim]``."""
        context = x if context is None else context
        chunks = list(context) if isinstance(context, (list, tuple)) else [context]
        q = self._heads(self.q_proj(x))
        k = [self._heads(self.k_proj(c)) for c in chunks]
        v = [self._heads(self.v_proj(c)) for c in chunks]
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
        B, _, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))

    def _heads(self, t):
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, -1).transpose(1, 2)


def _register_flops():
    """FLOP formulas so torch.utils.flop_counter counts the op: 4·B·H·Lq·Lk·D forward (two
    matmuls) and 2.5x that backward (five), masks and causality not subtracted (as for SDPA)."""
    from torch.utils.flop_counter import register_flop_formula

    def forward_flops(q, k, *args, **kwargs):
        B, H, Lq, D = q
        return 4 * B * H * Lq * sum(c[2] for c in k) * D

    def backward_flops(q, k, *args, **kwargs):
        return forward_flops(q, k) * 5 // 2

    register_flop_formula(torch.ops.selfboottok.attention)(forward_flops)
    register_flop_formula(torch.ops.selfboottok.attention_backward)(backward_flops)


_register_flops()
