"""Flash attention (forward and FlashAttention-2 backward) in Triton, keys in 1..4 chunks.

Semantics match ``selfboottok.ops._torch_impl.attention_reference``. The keys are the
concatenation of the chunks along the sequence; each chunk is read in place with its own strides,
and the padding mask and the causal diagonal use the global key index. Softmax runs in the base-2
domain (``log2(e)`` folded into the scale); ``lse`` is stored in natural log, ``-inf`` for a row
with no allowed key (whose output and gradients are 0).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd", "MAX_CHUNKS"]

MAX_CHUNKS = 4
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    # fp32 inputs use IEEE fp32 (no TF32); the interpreter's half-precision dot is wrong, so
    # there both operands go up to fp32 (after the same rounding the GPU path applies)
    if INTERPRET or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # the interpreter truncates fp32 -> bf16; round to nearest even by hand first, as the GPU does
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _i64(x):
    return tl.cast(x, tl.int64)


@triton.jit
def _program_tile(n_tiles):
    """(tile, batch*head) of this program: programs enumerate the tiles fastest."""
    pid = tl.program_id(0)
    return pid % n_tiles, (pid // n_tiles).to(tl.int64)


@triton.jit
def _query_rows(Lq, H, BLOCK_M: tl.constexpr):
    # (batch*head, batch, head, first row, rows) of this program's query tile
    tile, bh = _program_tile(tl.cdiv(Lq, BLOCK_M))
    start_m = tile * BLOCK_M
    return bh, bh // H, bh % H, start_m, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _key_strides(sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n, ROW64: tl.constexpr):
    # the chunks' K and V row strides, in int64 where some row offset passes 2**31 elements
    if ROW64:
        sk0n, sk1n, sk2n, sk3n = _i64(sk0n), _i64(sk1n), _i64(sk2n), _i64(sk3n)
        sv0n, sv1n, sv2n, sv3n = _i64(sv0n), _i64(sv1n), _i64(sv2n), _i64(sv3n)
    return sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n


@triton.jit
def _key_ok(Mask_row, koff, n, Lc, HAS_MASK: tl.constexpr):
    ok = n < Lc
    if HAS_MASK:
        ok = ok & (tl.load(Mask_row + koff + n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _allowed(Mask_row, koff, n, Lc, offs_m, Lq, Lk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: the keys n (of a chunk starting at koff) that rows offs_m may see."""
    ok = _key_ok(Mask_row, koff, n, Lc, HAS_MASK)[None, :]
    if CAUSAL:
        ok = ok & ((koff + n)[None, :] <= offs_m[:, None] + (Lk - Lq))
    return ok


@triton.jit
def _causal_hi(Lc, koff, start_m, Lq, Lk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # local end of the keys a query tile may see: the tiles above the diagonal are skipped
    hi = Lc
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + (Lk - Lq) - koff, 0))
    return hi


@triton.jit
def _probs(s, lse2, allowed, qk_scale):
    # P = exp(scale*s - lse) in base 2 as in the forward (same qk_scale), which in fp32 stays
    # closer to the forward's P, and so to delta, than forming the difference in natural units
    return tl.exp2(tl.where(allowed, s * qk_scale - lse2, float("-inf")))


@triton.jit
def _key_rows(Kb, Vb, sk, sv, start_n, Lc, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    # key numbers n (within the chunk) of the tile at start_n, and their K and V rows,
    # [BLOCK_N, BLOCK_D], zero past the chunk and the head dim
    n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (n < Lc)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(Kb + n[:, None] * sk + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(Vb + n[:, None] * sv + offs_d[None, :], mask=mask, other=0.0)
    return n, k, v


@triton.jit
def _fwd_chunk(
    acc, m_i, l_i, q, offs_m, start_m, Kb, Vb, sk, sv, Lc, koff, Mask_row, Lq, Lk, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    for start_n in range(0, _causal_hi(Lc, koff, start_m, Lq, Lk, BLOCK_M, CAUSAL), BLOCK_N):
        n, k, v = _key_rows(Kb, Vb, sk, sv, start_n, Lc, BLOCK_N, BLOCK_D, HEAD_DIM)
        allowed = _allowed(Mask_row, koff, n, Lc, offs_m, Lq, Lk, HAS_MASK, CAUSAL)
        s = tl.where(allowed, _dot(q, tl.trans(k), INTERPRET) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no allowed key so far keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRET), v, INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, sqb, sqh, sqm,
    K0, V0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n, L0,
    K1, V1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n, L1,
    K2, V2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n, L2,
    K3, V3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n, L3,
    Mask, Out, Lse, H, Lq, Lk, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
    ROW64: tl.constexpr,
):
    if ROW64:  # some row offset passes 2**31 elements
        sqm = _i64(sqm)
    sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n = _key_strides(
        sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n, ROW64)
    # one program per (query tile, batch*head), the query tile fastest so that programs running
    # together read the same keys (L2)
    bh, b, h, start_m, offs_m = _query_rows(Lq, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md_mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
    Mask_row = Mask + b * Lk
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_chunk(
        acc, m_i, l_i, q, offs_m, start_m, K0 + b * sk0b + h * sk0h, V0 + b * sv0b + h * sv0h, sk0n, sv0n,
        L0, 0, Mask_row, Lq, Lk, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 1:
        acc, m_i, l_i = _fwd_chunk(
            acc, m_i, l_i, q, offs_m, start_m, K1 + b * sk1b + h * sk1h, V1 + b * sv1b + h * sv1h, sk1n, sv1n,
            L1, L0, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 2:
        acc, m_i, l_i = _fwd_chunk(
            acc, m_i, l_i, q, offs_m, start_m, K2 + b * sk2b + h * sk2h, V2 + b * sv2b + h * sv2h, sk2n, sv2n,
            L2, L0 + L1, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 3:
        acc, m_i, l_i = _fwd_chunk(
            acc, m_i, l_i, q, offs_m, start_m, K3 + b * sk3b + h * sk3h, V3 + b * sv3b + h * sv3h, sk3n, sv3n,
            L3, L0 + L1 + L2, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    out = acc / l_safe[:, None]
    tl.store(Out + bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             _cast(out, Out.dtype.element_ty, INTERPRET), mask=md_mask)
    tl.store(Lse + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_kv(
    Q, sqb, sqh, sqm, DO, sdob, sdoh, sdom, Lse, Delta,
    K, V, DK, DV, skb, skh, skn, svb, svh, svn, Lc, koff,
    Mask, H, Lq, Lk, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, ROW64: tl.constexpr,
):
    # dK, dV of one key tile of one chunk (starting at key koff), looping over the query tiles
    # that can see it; one launch per chunk, since a chunk's gradients read only its own keys
    t, bh = _program_tile(tl.cdiv(Lc, BLOCK_N))
    b, h = bh // H, bh % H
    if ROW64:  # some row offset passes 2**31 elements
        sqm, sdom, skn, svn = _i64(sqm), _i64(sdom), _i64(skn), _i64(svn)
    Qb = Q + b * sqb + h * sqh
    DOb = DO + b * sdob + h * sdoh
    Lse_bh = Lse + bh * Lq
    Delta_bh = Delta + bh * Lq
    Mask_row = Mask + b * Lk
    start_n = t * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    offs_n, k, v = _key_rows(K + b * skb + h * skh, V + b * svb + h * svh, skn, svn, start_n, Lc,
                             BLOCK_N, BLOCK_D, HEAD_DIM)
    key_ok = _key_ok(Mask_row, koff, offs_n, Lc, HAS_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # the first query that sees the tile's first key, rounded down to a tile
        lo = tl.maximum(koff + start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        m = start_m + offs_m
        mmask = m < Lq
        qT = tl.load(Qb + m[None, :] * sqm + offs_d[:, None], mask=mmask[None, :] & dmask[:, None], other=0.0)
        do = tl.load(DOb + m[:, None] * sdom + offs_d[None, :], mask=mmask[:, None] & dmask[None, :],
                     other=0.0)
        lse = tl.load(Lse_bh + m, mask=mmask, other=float("-inf"))
        delta = tl.load(Delta_bh + m, mask=mmask, other=0.0)
        row_ok = lse != float("-inf")
        allowed = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            allowed = allowed & ((koff + offs_n)[:, None] <= m[None, :] + (Lk - Lq))
        lse2 = tl.where(row_ok, lse * _LOG2E, 0.0)
        pT = _probs(_dot(k, qT, INTERPRET), lse2[None, :], allowed, qk_scale)
        dv += _dot(_cast(pT, do.dtype, INTERPRET), do, INTERPRET)
        dpT = _dot(v, tl.trans(do), INTERPRET)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_cast(dsT, qT.dtype, INTERPRET), tl.trans(qT), INTERPRET)
    dk = dk * scale
    offs = bh * Lc * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    nd_mask = (offs_n < Lc)[:, None] & dmask[None, :]
    tl.store(DK + offs, _cast(dk, DK.dtype.element_ty, INTERPRET), mask=nd_mask)
    tl.store(DV + offs, _cast(dv, DV.dtype.element_ty, INTERPRET), mask=nd_mask)


@triton.jit
def _bwd_q_chunk(
    dq, q, do, lse2, delta, row_ok, offs_m, start_m, Kb, Vb, sk, sv, Lc, koff, Mask_row, Lq, Lk, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    for start_n in range(0, _causal_hi(Lc, koff, start_m, Lq, Lk, BLOCK_M, CAUSAL), BLOCK_N):
        n, k, v = _key_rows(Kb, Vb, sk, sv, start_n, Lc, BLOCK_N, BLOCK_D, HEAD_DIM)
        allowed = _allowed(Mask_row, koff, n, Lc, offs_m, Lq, Lk, HAS_MASK, CAUSAL) & row_ok[:, None]
        p = _probs(_dot(q, tl.trans(k), INTERPRET), lse2[:, None], allowed, qk_scale)
        dp = _dot(do, tl.trans(v), INTERPRET)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, INTERPRET), k, INTERPRET)
    return dq


@triton.jit
def _attn_bwd_q(
    Q, sqb, sqh, sqm, DO, sdob, sdoh, sdom, Lse, Delta, DQ,
    K0, V0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n, L0,
    K1, V1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n, L1,
    K2, V2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n, L2,
    K3, V3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n, L3,
    Mask, H, Lq, Lk, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
    ROW64: tl.constexpr,
):
    # dQ of one query tile, looping over every chunk's key tiles
    if ROW64:  # some row offset passes 2**31 elements
        sqm, sdom = _i64(sqm), _i64(sdom)
    sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n = _key_strides(
        sk0n, sk1n, sk2n, sk3n, sv0n, sv1n, sv2n, sv3n, ROW64)
    bh, b, h, start_m, offs_m = _query_rows(Lq, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    md_mask = mmask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=md_mask, other=0.0)
    lse = tl.load(Lse + bh * Lq + offs_m, mask=mmask, other=float("-inf"))
    delta = tl.load(Delta + bh * Lq + offs_m, mask=mmask, other=0.0)
    row_ok = lse != float("-inf")
    lse2 = tl.where(row_ok, lse * _LOG2E, 0.0)
    Mask_row = Mask + b * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_q_chunk(
        dq, q, do, lse2, delta, row_ok, offs_m, start_m,
        K0 + b * sk0b + h * sk0h, V0 + b * sv0b + h * sv0h,
        sk0n, sv0n, L0, 0, Mask_row, Lq, Lk, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 1:
        dq = _bwd_q_chunk(
            dq, q, do, lse2, delta, row_ok, offs_m, start_m,
            K1 + b * sk1b + h * sk1h, V1 + b * sv1b + h * sv1h,
            sk1n, sv1n, L1, L0, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 2:
        dq = _bwd_q_chunk(
            dq, q, do, lse2, delta, row_ok, offs_m, start_m,
            K2 + b * sk2b + h * sk2h, V2 + b * sv2b + h * sv2h,
            sk2n, sv2n, L2, L0 + L1, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    if NUM_CHUNKS > 3:
        dq = _bwd_q_chunk(
            dq, q, do, lse2, delta, row_ok, offs_m, start_m,
            K3 + b * sk3b + h * sk3h, V3 + b * sv3b + h * sv3h,
            sk3n, sv3n, L3, L0 + L1 + L2, Mask_row, Lq, Lk, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, CAUSAL, HAS_MASK, INTERPRET)
    dq = dq * scale
    tl.store(DQ + bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty, INTERPRET), mask=md_mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_M, BLOCK_N, num_warps) by (kernel, fp32, D > 64): the largest tiles (key tiles first for
# "kv", query tiles first otherwise) that ptxas compiles for sm_90 without register spills in the
# heaviest variant (4 chunks, mask, causal; the fp32 forward at D > 64 spills 4 bytes). fp32 runs
# IEEE dots on CUDA cores, hence its small tiles. Not timed on hardware.
_GPU_BLOCKS = {
    ("fwd", False, False): (128, 64, 8), ("fwd", False, True): (64, 64, 4),
    ("kv", False, False): (64, 128, 8), ("kv", False, True): (16, 64, 8),
    ("q", False, False): (128, 32, 8), ("q", False, True): (64, 32, 4),
    ("fwd", True, False): (16, 64, 4), ("fwd", True, True): (16, 64, 4),
    ("kv", True, False): (32, 32, 8), ("kv", True, True): (32, 32, 8),
    ("q", True, False): (32, 16, 8), ("q", True, True): (32, 16, 8),
}


def _blocks(kernel: str, D: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel "fwd", "kv" or "q"."""
    if _interpreted():
        # ~2 ms per program and per loop step; 16 still gives tests several tiles and ragged ends
        return 16, 16, 1, 1
    return (*_GPU_BLOCKS[(kernel, dtype == torch.float32, D > 64)], 2)


# row offsets (index * row stride within one batch and head) are int32 up to this, int64 beyond
_INT32_LIMIT = 2**31


def _check(q, ks, vs, key_padding_mask, *more):
    assert q.dim() == 4 and q.dtype in _DTYPES, (q.shape, q.dtype)
    B, H, Lq, D = q.shape
    assert D % 8 == 0 and 8 <= D <= 128 and min(B, H, Lq) >= 1, q.shape
    assert 1 <= len(ks) == len(vs) <= MAX_CHUNKS, (len(ks), len(vs))
    assert q.is_cuda or (_interpreted() and q.device.type == "cpu"), (
        f"Triton attention needs CUDA tensors (CPU only with TRITON_INTERPRET=1); got {q.device}")
    for k, v in zip(ks, vs):
        assert k.shape == v.shape and k.shape[:2] == (B, H) and k.shape[3] == D, (k.shape, v.shape)
    for t in (q, *ks, *vs, *more):
        assert t.dtype == q.dtype and t.device == q.device and t.stride(-1) == 1
    Lk = sum(k.shape[2] for k in ks)
    assert Lk >= 1 and max(Lq, Lk) * D < 2**31  # output offsets stay int32
    if key_padding_mask is not None:
        m = key_padding_mask
        assert m.dtype == torch.bool and m.shape == (B, Lk) and m.is_contiguous(), m.shape
        assert m.device == q.device
    return B, H, Lq, D, Lk


def _chunk_args(ks, vs):
    """(number of non-empty chunks, kernel arguments for MAX_CHUNKS slots). Empty chunks are
    dropped; unused slots repeat the first chunk with length 0 (compiled out)."""
    live = [i for i, k in enumerate(ks) if k.shape[2] > 0]
    args = []
    for c in range(MAX_CHUNKS):
        i = live[c] if c < len(live) else live[0]
        k, v = ks[i], vs[i]
        args += [k, v, *k.stride()[:3], *v.stride()[:3], k.shape[2] if c < len(live) else 0]
    return len(live), args


def _meta(q, ks, vs, key_padding_mask, causal, n_chunks, *more):
    rows = (t.shape[2] * t.stride(2) for t in (q, *ks, *vs, *more))
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])), HEAD_DIM=q.shape[3], NUM_CHUNKS=n_chunks,
        CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, INTERPRET=_interpreted(),
        ROW64=max(rows) >= _INT32_LIMIT,
    )


def _mask_arg(q, key_padding_mask):
    return q if key_padding_mask is None else key_padding_mask.view(torch.uint8)


def attention_fwd(q, ks, vs, key_padding_mask, causal: bool, scale: float):
    """Returns ``(out [B,H,Lq,D] in q's dtype, lse float32 [B,H,Lq])``; see the module doc."""
    B, H, Lq, D, Lk = _check(q, ks, vs, key_padding_mask)
    out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    n, chunk_args = _chunk_args(ks, vs)
    BLOCK_M, BLOCK_N, warps, stages = _blocks("fwd", D, q.dtype)
    _attn_fwd[(triton.cdiv(Lq, BLOCK_M) * B * H,)](
        q, q.stride(0), q.stride(1), q.stride(2), *chunk_args,
        _mask_arg(q, key_padding_mask), out, lse, H, Lq, Lk, float(scale) * _LOG2E.value,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages,
        **_meta(q, ks, vs, key_padding_mask, causal, n),
    )
    return out, lse


def attention_bwd(q, ks, vs, key_padding_mask, causal, scale, out, lse, dout, delta):
    """Returns ``(dq, dks, dvs)``, contiguous, in q's dtype; ``delta = rowsum(dout*out) - g_lse``
    comes from the caller, so ``out`` itself is not read."""
    B, H, Lq, D, Lk = _check(q, ks, vs, key_padding_mask, dout)
    assert out.shape == dout.shape == q.shape
    for t in (lse, delta):
        assert t.shape == (B, H, Lq) and t.dtype == torch.float32 and t.is_contiguous()
    dq = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    dks = [torch.empty(k.shape, dtype=q.dtype, device=q.device) for k in ks]
    dvs = [torch.empty(v.shape, dtype=q.dtype, device=q.device) for v in vs]
    n, q_args = _chunk_args(ks, vs)
    meta = _meta(q, ks, vs, key_padding_mask, causal, n, dout)
    mask = _mask_arg(q, key_padding_mask)
    qdo = (q, q.stride(0), q.stride(1), q.stride(2), dout, dout.stride(0), dout.stride(1), dout.stride(2))

    BLOCK_M, BLOCK_N, warps, stages = _blocks("kv", D, q.dtype)
    kv_meta = dict(meta)
    del kv_meta["NUM_CHUNKS"]  # one chunk a launch
    koff = 0
    for k, v, dk, dv in zip(ks, vs, dks, dvs):
        Lc = k.shape[2]
        if Lc:
            _attn_bwd_kv[(triton.cdiv(Lc, BLOCK_N) * B * H,)](
                *qdo, lse, delta, k, v, dk, dv, *k.stride()[:3], *v.stride()[:3], Lc, koff,
                mask, H, Lq, Lk, float(scale) * _LOG2E.value, float(scale),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages, **kv_meta,
            )
        koff += Lc
    BLOCK_M, BLOCK_N, warps, stages = _blocks("q", D, q.dtype)
    _attn_bwd_q[(triton.cdiv(Lq, BLOCK_M) * B * H,)](
        *qdo, lse, delta, dq, *q_args, mask, H, Lq, Lk, float(scale) * _LOG2E.value, float(scale),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages, **meta,
    )
    return dq, dks, dvs
