"""Fused scaled-dot-product attention: `attention` and its custom ops."""

from __future__ import annotations

import functools
import math

import torch

from . import _attention_auto as auto
from . import _backend, _flops
from ._torch_impl import attention_allowed, attention_backward_reference, attention_reference

__all__ = ["attention", "status", "which_backend"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 128
MAX_CHUNKS = 4
KERNELS = auto.KERNELS


def attention(q, k, v, *, key_padding_mask=None, causal=False, scale=None, backend="auto"):
    """``softmax(q k^T * scale) @ v`` per batch and head, with masking.

    Args:
        q: ``[B,H,Lq,D]``; ``D <= 128`` and a multiple of 8. float32/float16/bfloat16
            (float64 for references and tests: served by the ``sdpa`` and ``torch`` backends).
        k, v: ``[B,H,Lk,D]``, or equal-length lists/tuples of up to 4 chunks ``[B,H,Lk_i,D]``
            read as their concatenation along the sequence. The ``cuda`` and ``triton`` kernels
            read the chunks in place (no copy); ``sdpa`` and ``torch`` concatenate them. Any
            strides with a contiguous last dim are read as they are. Same dtype and device as q.
        key_padding_mask: bool ``[B,Lk]``, True for a real key.
        causal: query ``i`` may attend key ``j`` iff ``j <= i + (Lk - Lq)``: the diagonal is
            aligned bottom-right (FlashAttention convention), so the last query sees every key.
        scale: multiplies the scores; default ``1/sqrt(D)``.
        backend: ``"auto"`` (see :func:`which_backend`) | ``"sdpa"`` (PyTorch's fused kernels,
            CPU and CUDA) | ``"cuda"`` | ``"triton"`` | ``"torch"`` (the explicit reference) |
            ``"cpu"`` (``sdpa`` on CPU tensors, its earlier name).

    A query row with no allowed key returns zeros, and its gradients are zero.
    Returns ``[B,H,Lq,D]`` in the dtype of ``q``.
    """
    q, k, v, key_padding_mask, scale = _check(q, k, v, key_padding_mask, causal, scale)
    name, _ = _resolve(backend, q, k, v, key_padding_mask, causal, scale)
    out, _ = torch.ops.selfboottok.attention(q, k, v, key_padding_mask, bool(causal), scale, name)
    return out


def which_backend(q, k, v, *, key_padding_mask=None, causal=False, scale=None, backend="auto"):
    """(backend, why) that :func:`attention` runs for these arguments. ``auto``: ``sdpa`` on CPU
    tensors; on CUDA tensors ``sdpa`` unless a kernel of ours was measured faster than it for
    the call's GPU, dtype, head dim, shape class, causality and pass (forward, or forward and
    backward when an input requires grad): see ``selfboottok/ops/_attention_auto.py``."""
    q, k, v, key_padding_mask, scale = _check(q, k, v, key_padding_mask, causal, scale)
    return _resolve(backend, q, k, v, key_padding_mask, causal, scale)


def _resolve(backend, q, k, v, key_padding_mask, causal, scale):
    avail = status(q.device.type)
    if q.dtype == torch.float64:
        for name in KERNELS:
            avail[name] = (False, "the kernels take float32, float16 and bfloat16, not float64")
    if backend != "auto":
        name = _backend.resolve(backend, q.device, (), avail)
        return ("sdpa" if name == "cpu" else name), "requested"
    if q.device.type != "cuda":
        name = "sdpa" if avail["sdpa"][0] else "torch"
        return name, f"{q.device.type} tensors: {avail[name][1]}"
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, *k, *v))
    key = auto.key_for(_gpu_name(q.device), q.dtype, q.shape[3], q.shape[2],
                       sum(c.shape[2] for c in k), causal, backward)
    kernels = [n for n in KERNELS if avail[n][0]]
    if torch.compiler.is_compiling():
        return auto.pick(key, kernels), "from attention_table.json (compiled)"
    measure = None
    if auto.benchmark_enabled():
        def measure(name):
            return auto.time_ms(functools.partial(_trial, name, q, k, v, key_padding_mask, causal, scale, backward))
    return auto.choose(key, kernels, measure)


_GPU_NAMES: dict = {}  # a plain dict, not lru_cache, so that torch.compile traces the lookup


def _gpu_name(device):
    if device not in _GPU_NAMES:
        _GPU_NAMES[device] = torch.cuda.get_device_name(device)
    return _GPU_NAMES[device]


def _trial(name, q, k, v, key_padding_mask, causal, scale, backward):
    """One call of backend `name` on the arguments' tensors (for in-process timing)."""

    def leaf(t):
        return t.detach().requires_grad_(backward)

    with torch.enable_grad() if backward else torch.no_grad():
        out, _ = torch.ops.selfboottok.attention(
            leaf(q), [leaf(c) for c in k], [leaf(c) for c in v], key_padding_mask, causal, scale, name)
        if backward:
            out.backward(torch.ones_like(out))


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
    """backend -> (available for attention on `device_type` tensors, reason). The `sdpa`
    backend is PyTorch's, so unlike the other ops it needs no compiled extension."""
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
        out["sdpa"] = (True, "PyTorch's fused CPU flash-attention kernels")
    elif device_type == "cuda":
        out["sdpa"] = (True, "PyTorch's fused kernels (cuDNN, flash or memory-efficient, as SDPA picks)")
    else:
        out["sdpa"] = (False, f"PyTorch's fused kernels take CPU or CUDA tensors, not {device_type}")
    if device_type == "cpu":
        out["cpu"] = (True, "the sdpa backend on CPU tensors (its name before sdpa served CUDA)")
    else:
        out["cpu"] = (False, "tensors are not on the CPU")
    out["torch"] = (True, "pure-PyTorch reference")
    return out


def _lse_dtype(dtype):
    # float64 inputs keep a float64 lse so the backward matches the float64 reference
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cat(chunks):
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def _delta(dout, out, dtype):
    """rowsum(dout * out), the backward's per-row term when the lse has no gradient."""
    return (dout.to(dtype) * out.to(dtype)).sum(-1)


# ---- the sdpa backend: PyTorch's fused kernels with this op's semantics ----------------------

_SDPA_KINDS = {1: "flash", 2: "efficient", 3: "cudnn"}  # torch._fused_sdp_choice's SDPBackend


def _sdpa_plan(q, k, key_padding_mask, causal):
    """(additive bias or None, is_causal, rows with no allowed key or None) for the fused
    kernels. Their own causal flag is aligned top-left, so it serves only Lq == Lk without a
    padding mask; otherwise the bias holds the mask, in its smallest broadcast shape with the
    key dim padded to 16 elements (the memory-efficient kernel's alignment). A row with no
    allowed key sees every key there instead (an all -inf row is NaN in these kernels): its
    output and lse are set afterwards."""
    Lq, Lk = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or Lq == Lk):
        return None, causal, None
    allowed = attention_allowed(key_padding_mask, causal, Lq, Lk, q.device)
    empty = ~allowed.any(-1, keepdim=True)
    padded = torch.zeros(*allowed.shape[:-1], -(-Lk // 16) * 16, dtype=q.dtype, device=q.device)
    bias = padded[..., :Lk].masked_fill_(~(allowed | empty), float("-inf"))
    return bias, False, empty[..., 0]


def _sdpa_kind(q, k, v, bias, is_causal, scale):
    """The fused kernel SDPA itself would run here (it honours torch.nn.attention.sdpa_kernel);
    "math" when none applies."""
    if q.device.type == "cpu":
        return "cpu_flash"
    choice = torch._fused_sdp_choice(q, k, v, bias, 0.0, is_causal, scale=scale)
    return _SDPA_KINDS.get(int(choice), "math")


def _expanded(bias, q, k):
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _efficient_lse_len(Lq):
    return Lq if torch.version.hip else -(-Lq // 32) * 32


@functools.lru_cache(maxsize=None)
def _cudnn_lse_shape(B, H, Lq, Lk, D, dtype):
    """The lse shape the cuDNN kernel returns and its backward takes, from its meta function."""
    q, k = (torch.empty(B, H, L, D, dtype=dtype, device="meta") for L in (Lq, Lk))
    return tuple(torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, k, None, True)[1].shape)


def _sdpa_forward(q, k, v, key_padding_mask, causal, scale):
    bias, is_causal, empty = _sdpa_plan(q, k, key_padding_mask, causal)
    kind = _sdpa_kind(q, k, v, bias, is_causal, scale)
    aten = torch.ops.aten
    if kind == "math":
        return attention_reference(q, k, v, key_padding_mask, causal, scale, return_lse=True)
    if kind == "cpu_flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
    elif kind == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
    elif kind == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(
            q, k, v, _expanded(bias, q, k), True, 0.0, is_causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]
    else:
        out, lse = aten._scaled_dot_product_cudnn_attention(
            q, k, v, bias, True, 0.0, is_causal, False, scale=scale)[:2]
        lse = lse.reshape(q.shape[:3])
    if empty is not None:
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _sdpa_backward(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta):
    bias, is_causal, _ = _sdpa_plan(q, k, key_padding_mask, causal)
    kind = _sdpa_kind(q, k, v, bias, is_causal, scale)
    aten = torch.ops.aten
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if kind == "math":
        delta = _delta(dout, out, lse.dtype) if delta is None else delta
        return attention_backward_reference(q, k, v, key_padding_mask, causal, scale, lse, dout, delta)
    # +inf on rows with no allowed key: P = exp(s - lse) = 0 there, whatever the bias row holds
    lse_in = lse.masked_fill(torch.isneginf(lse), float("inf"))
    if kind == "cpu_flash":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse_in, 0.0, is_causal, attn_mask=bias, scale=scale)
    else:
        dout = dout.contiguous()
        # dropout is off: the kernels never read the random-number state
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        if kind == "flash":
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse_in, None, None, Lq, Lk, 0.0, is_causal, seed, seed, scale=scale)
        elif kind == "efficient":
            padded = lse_in.new_full((B, H, _efficient_lse_len(Lq)), float("inf"))
            padded[..., :Lq] = lse_in
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                dout, q, k, v, _expanded(bias, q, k), out, padded, seed, seed, 0.0,
                [True, True, True, False], is_causal, scale=scale)
        else:
            shape = _cudnn_lse_shape(B, H, Lq, Lk, D, q.dtype)
            dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse_in.reshape(shape), seed, seed, bias, None, None, Lq, Lk,
                0.0, is_causal, scale=scale)
    if delta is not None:
        # the fused kernels take delta = rowsum(dout * out); a gradient of the lse adds
        # P * (that - delta), done here by explicit math
        extra = _delta(dout, out, lse.dtype) - delta
        eq, ek, _ = attention_backward_reference(
            q, k, v, key_padding_mask, causal, scale, lse, torch.zeros_like(dout), -extra)
        dq, dk = dq + eq, dk + ek
    return dq, dk, dv


# The inputs of both ops, as a schema: keys and values come as lists of chunks.
_INPUTS = "Tensor q, Tensor[] k, Tensor[] v, Tensor? key_padding_mask, bool causal, float scale"


@torch.library.custom_op("selfboottok::attention", mutates_args=(),
                         schema=f"({_INPUTS}, str backend) -> (Tensor, Tensor)")
def _attention_op(q, k, v, key_padding_mask, causal, scale, backend):
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
        elif backend == "sdpa":
            out, lse = _sdpa_forward(q, _cat(k), _cat(v), key_padding_mask, causal, scale)
        else:
            out, lse = attention_reference(
                q, _cat(k), _cat(v), key_padding_mask, causal, scale, return_lse=True
            )
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@_attention_op.register_fake
def _fake(q, k, v, key_padding_mask, causal, scale, backend):
    B, H, Lq, D = q.shape
    return q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op(
    "selfboottok::attention_backward", mutates_args=(),
    schema=f"({_INPUTS}, Tensor out, Tensor lse, Tensor dout, Tensor? delta, str backend) "
           "-> (Tensor, Tensor[], Tensor[])")
def _attention_backward_op(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta, backend):
    """-> (dq, dk chunks, dv chunks), given ``delta = rowsum(dout * out) - grad_lse``, or None
    when the lse has no gradient."""
    with torch.no_grad():
        if backend in KERNELS and delta is None:
            delta = _delta(dout, out, lse.dtype)
        if backend == "cuda":
            dq, dk, dv = torch.ops.selfboottok.attention_bwd_kernel(
                q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta
            )
        elif backend == "triton":
            from .triton.attention import attention_bwd

            dq, dk, dv = attention_bwd(q, k, v, key_padding_mask, causal, scale, out, lse, dout, delta)
        else:
            kc, vc = _cat(k), _cat(v)
            if backend == "sdpa":
                dq, dk, dv = _sdpa_backward(
                    q, kc, vc, key_padding_mask, causal, scale, out, lse, dout, delta
                )
            else:
                delta = _delta(dout, out, lse.dtype) if delta is None else delta
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
    delta = None
    if g_lse is not None:
        delta = (_delta(dout, out, lse.dtype) - g_lse.to(lse.dtype)).contiguous()
    dq, dk, dv = torch.ops.selfboottok.attention_backward(
        q, k, v, key_padding_mask, ctx.causal, ctx.scale, out, lse, dout, delta, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


_flops.register()
auto.table()  # read now, not inside a torch.compile trace
