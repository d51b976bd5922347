"""Triton attention kernels (attention_fwd / attention_bwd) against the float64 reference, with
FlashAttention's error rule (tests/_attention_checks.py). Runs under TRITON_INTERPRET=1 on CPU
when there is no GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from _attention_checks import check_flash_rule  # noqa: E402
from selfboottok.ops._torch_impl import attention_reference  # noqa: E402
from selfboottok.ops.triton import attention as triton_attention  # noqa: E402
from selfboottok.ops.triton.attention import attention_bwd, attention_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET != 1", allow_module_level=True)

F64 = torch.float64


def make_inputs(gen, B, H, Lq, lengths, D, layout, dtype):
    """q [B,H,Lq,D] and key/value chunks as views in `layout`:
    "bhld" contiguous; "blhd" transposed views of [B,L,H,D] (chunks slice one such tensor);
    "mixed" contiguous q, chunks alternately contiguous and transposed (k and v opposite);
    "packed" q, k, v of self-attention read from one [B,L,3,H,D] projection."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)

    Lk = sum(lengths)
    cuts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]

    def split(x):
        return [x[:, :, a:b] for a, b in zip(cuts, cuts[1:])]

    if layout == "packed":
        assert Lq == Lk and len(lengths) == 1
        x = randn(B, Lq, 3, H, D)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        return q, [k], [v]
    if layout == "blhd":
        q = randn(B, Lq, H, D).transpose(1, 2)
        k, v = (randn(B, Lk, H, D).transpose(1, 2) for _ in range(2))
        return q, split(k), split(v)
    q = randn(B, H, Lq, D)
    if layout == "bhld":
        k, v = randn(B, H, Lk, D), randn(B, H, Lk, D)
        return q, split(k), split(v)
    assert layout == "mixed"
    ks, vs = [], []
    for i, L in enumerate(lengths):
        flat, transposed = randn(B, H, L, D), randn(B, L, H, D).transpose(1, 2)
        ks.append(flat if i % 2 == 0 else transposed)
        vs.append(transposed if i % 2 == 0 else flat)
    return q, ks, vs


def make_mask(gen, kind, B, Lk):
    if kind is None:
        return None
    mask = torch.rand(B, Lk, generator=gen) > 0.3
    if kind == "empty_row":
        mask[-1] = False  # the last batch element has no real key
    return mask.to(DEVICE)


def reference(q, ks, vs, mask, causal, scale, dout, g_lse, upcast):
    """(out, lse, dq, dk, dv) of attention_reference with autograd for the loss
    sum(out*dout) + sum(lse*g_lse); float64 maths when `upcast`, else the input dtype."""
    cast = (lambda t: t.to(F64)) if upcast else (lambda t: t)
    q, k, v = (cast(t).detach().requires_grad_() for t in (q, torch.cat(ks, 2), torch.cat(vs, 2)))
    out, lse = attention_reference(q, k, v, mask, causal, scale, upcast=upcast, return_lse=True)
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    loss = (out * cast(dout)).sum() + (finite_lse * g_lse.to(lse.dtype)).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def run_kernels(q, ks, vs, mask, causal, scale, dout, g_lse):
    out, lse = attention_fwd(q, ks, vs, mask, causal, scale)
    delta = (dout.float() * out.float()).sum(-1) - g_lse
    dq, dks, dvs = attention_bwd(q, ks, vs, mask, causal, scale, out, lse, dout, delta)
    return out, lse, dq, dks, dvs


def check_case(gen, B, H, Lq, lengths, D, mask_kind, causal, layout, dtype, with_g_lse=True, scale=None):
    scale = D**-0.5 if scale is None else scale
    q, ks, vs = make_inputs(gen, B, H, Lq, lengths, D, layout, dtype)
    Lk = sum(lengths)
    mask = make_mask(gen, mask_kind, B, Lk)
    dout = torch.randn(B, H, Lq, D, generator=gen, dtype=F64).to(dtype).to(DEVICE)
    g_lse = torch.randn(B, H, Lq, generator=gen) if with_g_lse else torch.zeros(B, H, Lq)
    g_lse = g_lse.to(DEVICE)

    out, lse, dq, dks, dvs = run_kernels(q, ks, vs, mask, causal, scale, dout, g_lse)
    ref = reference(q, ks, vs, mask, causal, scale, dout, g_lse, upcast=True)
    base = reference(q, ks, vs, mask, causal, scale, dout, g_lse, upcast=False)

    assert out.dtype == dq.dtype == dtype and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous() and dq.is_contiguous()
    assert len(dks) == len(dvs) == len(ks)
    for dk, dv, k in zip(dks, dvs, ks):
        assert dk.shape == dv.shape == k.shape and dk.dtype == dv.dtype == dtype
        assert dk.is_contiguous() and dv.is_contiguous()
    got = (out, dq, torch.cat(dks, 2), torch.cat(dvs, 2))
    for name, g in zip(("out", "dq", "dk", "dv"), got):
        assert torch.isfinite(g).all(), name

    # lse: -inf exactly on the rows with no allowed key, and nowhere NaN
    r_out, r_lse, *r_grads = ref
    b_out, b_lse, *b_grads = base
    empty = torch.isinf(r_lse)
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    if mask is not None:
        # keys nobody sees get exactly zero gradients
        hidden = ~mask[:, None, :].expand(B, H, Lk)
        assert (got[2][hidden] == 0).all() and (got[3][hidden] == 0).all()

    names = ("out", "dq", "dk", "dv")
    errors = check_flash_rule(dtype, dict(zip(names, got)), dict(zip(names, (b_out, *b_grads))),
                              dict(zip(names, (r_out, *r_grads))))
    if (~empty).any():
        errors.update(check_flash_rule(dtype, {"lse": lse[~empty]}, {"lse": b_lse[~empty]},
                                       {"lse": r_lse[~empty]}))
    return errors


# (B, H, Lq, chunk lengths, D, padding mask, causal, layout)
CASES = [
    (2, 2, 16, [16], 64, None, False, "bhld"),
    (1, 2, 17, [33], 32, "pad", True, "blhd"),  # Lq < Lk
    (1, 2, 33, [17], 64, None, True, "bhld"),  # Lq > Lk: the first 16 rows see no key
    (1, 2, 7, [1], 32, None, False, "bhld"),  # a single key
    (1, 2, 17, [257], 128, "pad", False, "blhd"),
    (2, 1, 17, [5, 0, 12], 72, "empty_row", True, "mixed"),  # an empty chunk, a batch with no key
    (1, 2, 24, [24], 40, "pad", True, "packed"),  # self-attention from one qkv projection
    (1, 1, 9, [1, 16, 3, 13], 8, "pad", False, "mixed"),  # MAX_CHUNKS non-empty chunks
]


def _case_id(case):
    B, H, Lq, lengths, D, mask, causal, layout = case
    keys = "+".join(map(str, lengths))
    return f"{B}x{H}-q{Lq}-k{keys}-d{D}-{mask or 'nomask'}-{'causal' if causal else 'full'}-{layout}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(gen, case, dtype):
    check_case(gen, *case, dtype)


def test_float16_chunks(gen):
    check_case(gen, 2, 2, 20, [7, 19], 64, "empty_row", True, "mixed", torch.float16)


def test_zero_g_lse_and_odd_scale(gen):
    check_case(gen, 1, 2, 17, [9, 24], 32, "pad", False, "blhd", torch.float32, with_g_lse=False, scale=0.61)


def test_causal_rows_without_keys(gen):
    """Lq > Lk causal: rows i < Lq - Lk see no key (lse = -inf, out = dq = 0); with a padding
    mask that hides the first keys, more rows lose every key."""
    B, H, Lq, Lk, D = 1, 2, 20, 6, 32
    q, ks, vs = make_inputs(gen, B, H, Lq, [Lk], D, "bhld", torch.float32)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    mask[:, :2] = False
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    g_lse = torch.ones(B, H, Lq, device=DEVICE)
    out, lse, dq, dks, dvs = run_kernels(q, ks, vs, mask, True, 0.2, dout, g_lse)
    # row i sees keys j <= i - 14 that are not padding: none for i < 16
    assert torch.isneginf(lse[:, :, :16]).all() and torch.isfinite(lse[:, :, 16:]).all()
    assert (out[:, :, :16] == 0).all() and (dq[:, :, :16] == 0).all()
    assert (out[:, :, 16:] != 0).any() and (dq[:, :, 16:] != 0).any()
    assert (dks[0][:, :, :2] == 0).all() and (dvs[0][:, :, :2] == 0).all()
    assert (dvs[0][:, :, 2:] != 0).any()


def test_int64_row_offsets(gen, monkeypatch):
    """Row offsets past 2**31 elements switch the kernels to int64 strides; forced here on a
    small problem, the results must not change."""
    q, ks, vs = make_inputs(gen, 2, 2, 19, [11, 14], 32, "mixed", torch.bfloat16)
    mask = make_mask(gen, "pad", 2, 25)
    dout = torch.randn(q.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    g_lse = torch.randn(2, 2, 19, generator=gen).to(DEVICE)
    plain = run_kernels(q, ks, vs, mask, True, 0.3, dout, g_lse)
    monkeypatch.setattr(triton_attention, "_INT32_LIMIT", 1)
    assert triton_attention._meta(q, ks, vs, mask, True, 2)["ROW64"]
    wide = run_kernels(q, ks, vs, mask, True, 0.3, dout, g_lse)
    out, lse, dq, dks, dvs = plain
    for a, b in zip([out, lse, dq, *dks, *dvs], [wide[0], wide[1], wide[2], *wide[3], *wide[4]]):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="several full-size tiles need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_large_gpu(gen, dtype, D):
    check_case(gen, 2, 3, 1000, [300, 0, 777], D, "pad", True, "blhd", dtype)
    check_case(gen, 2, 3, 517, [1024], D, None, False, "bhld", dtype)
