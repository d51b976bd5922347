"""selfboottok.ops.attention on every CPU backend against the float64 reference, with the
FlashAttention error rule for low precision (tests/_attention_checks.py)."""

import pytest
import torch

from _attention_checks import check_flash_rule
from selfboottok.ops import MultiheadAttention, attention
from selfboottok.ops._torch_impl import attention_reference
from selfboottok.ops.attention import status, which_backend

# "cpu" is the sdpa backend's former name on CPU tensors (test_cpu_is_sdpa)
BACKENDS = [name for name, (ok, _) in status("cpu").items() if ok and name != "cpu"]
NAMES = ("out", "dq", "dk", "dv")

# (B, H, Lq, Lk, D, padding mask, causal)
CASES = [
    (2, 2, 16, 16, 64, False, False),
    (2, 3, 17, 33, 32, True, True),  # Lq < Lk
    (2, 2, 33, 17, 64, False, True),  # Lq > Lk: the first rows see no key
    (1, 2, 7, 1, 32, False, False),
    (2, 1, 5, 257, 128, True, False),
    (1, 2, 17, 17, 128, True, True),
]


def make(gen, B, H, Lq, Lk, D, padded=False, dtype=torch.float64):
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk))
    mask = None
    if padded:
        mask = torch.rand(B, Lk, generator=gen) > 0.3
        mask[:, 0] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def forward_backward(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return (out, *grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(gen, backend, case, dtype):
    *shape, padded, causal = case
    q, k, v, mask = make(gen, *shape, padded=padded)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref = forward_backward(lambda *t: attention_reference(*t, mask, causal), q, k, v, dout)
    low = [t.to(dtype) for t in (q, k, v)]
    base = forward_backward(lambda *t: attention_reference(*t, mask, causal, upcast=False), *low, dout)
    got = forward_backward(
        lambda *t: attention(*t, key_padding_mask=mask, causal=causal, backend=backend), *low, dout
    )
    for g, r in zip(got, ref):
        assert g.dtype == dtype and g.shape == r.shape
    check_flash_rule(dtype, dict(zip(NAMES, got)), dict(zip(NAMES, base)), dict(zip(NAMES, ref)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("cuda", "triton")])
def test_float64_exact(gen, backend):
    """float64 is for references: only the cpu and torch backends take it."""
    q, k, v, mask = make(gen, 2, 2, 9, 23, 32, padded=True)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref = forward_backward(lambda *t: attention_reference(*t, mask, True), q, k, v, dout)
    got = forward_backward(
        lambda *t: attention(*t, key_padding_mask=mask, causal=True, backend=backend), q, k, v, dout
    )
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_rows_are_zero(gen, backend, dtype):
    q, k, v, mask = make(gen, 3, 2, 12, 8, 32, padded=True, dtype=dtype)
    mask[1] = False  # batch row 1 has no real key
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    out, dq, dk, dv = forward_backward(
        lambda *t: attention(*t, key_padding_mask=mask, causal=True, backend=backend), q, k, v, dout
    )
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    for t in (out[1], dq[1], dk[1], dv[1]):
        assert (t == 0).all()
    # causal with Lq > Lk: queries i < Lq - Lk see no key
    assert (out[:, :, :4] == 0).all() and (dq[:, :, :4] == 0).all()
    assert (out[0, :, 4:] != 0).any()
    # the reference agrees, gradients included
    ref = forward_backward(lambda *t: attention_reference(*t, mask, True), q, k, v, dout)
    for t in ref:
        assert torch.isfinite(t).all()
    assert (ref[0][1] == 0).all() and (ref[1][1] == 0).all() and (ref[2][1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_and_strided_views_equal_one_tensor(gen, backend):
    """Up to four chunks (one empty) and transposed views read in place give the result of one
    contiguous tensor, gradients included (kernels may tile differently at chunk borders)."""
    B, H, Lq, Lk, D = 2, 2, 10, 21, 64
    q, k, v, mask = make(gen, B, H, Lq, Lk, D, padded=True, dtype=torch.float32)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float32)
    full = forward_backward(
        lambda *t: attention(*t, key_padding_mask=mask, causal=True, backend=backend), q, k, v, dout
    )
    cuts = [(0, 4), (4, 4), (4, 5), (5, 21)]

    def chunked(q, k, v):
        # [B,L,H,D] storage seen as [B,H,L,D], as a projection's view(B,L,H,D).transpose(1,2) is
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        ks = [k[:, :, a:b].transpose(1, 2).contiguous().transpose(1, 2) for a, b in cuts]
        vs = [v[:, :, a:b] for a, b in cuts]
        assert not ks[-1].is_contiguous()
        return attention(q, ks, tuple(vs), key_padding_mask=mask, causal=True, backend=backend)

    for a, b in zip(forward_backward(chunked, q, k, v, dout), full):
        torch.testing.assert_close(a, b)


def test_too_many_chunks():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="at most 4 chunks"):
        attention(q, [q] * 5, [q] * 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_opcheck(gen, backend, padded):
    q, k, v, mask = make(gen, 2, 2, 5, 7, 16, padded=padded, dtype=torch.float32)
    ks = [k[:, :, :3].clone().requires_grad_(), k[:, :, 3:].clone().requires_grad_()]
    vs = [v[:, :, :3].clone().requires_grad_(), v[:, :, 3:].clone().requires_grad_()]
    q.requires_grad_()
    torch.library.opcheck(torch.ops.selfboottok.attention.default, (q, ks, vs, mask, True, 0.3, backend))
    out, lse = torch.ops.selfboottok.attention(q, ks, vs, mask, True, 0.3, backend)
    dout = torch.randn(out.shape, generator=gen)
    delta = (dout * out).sum(-1).detach()
    # the backward op is not differentiable itself (no double backward)
    plain = [[t.detach() for t in c] for c in (ks, vs)]
    args = (q.detach(), *plain, mask, True, 0.3, out.detach(), lse.detach(), dout, delta, backend)
    torch.library.opcheck(torch.ops.selfboottok.attention_backward.default, args)


def test_default_scale(gen):
    q, k, v, _ = make(gen, 1, 2, 6, 6, 32)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=32**-0.5))
    torch.testing.assert_close(attention(q, k, v, scale=0.7), attention_reference(q, k, v, None, False, 0.7))


def test_compile_matches_eager(gen):
    q, k, v, mask = make(gen, 2, 2, 9, 13, 32, padded=True, dtype=torch.float32)
    dout = torch.randn(q.shape, generator=gen)

    def fn(q, k, v):
        return attention(q, [k[:, :, :6], k[:, :, 6:]], [v[:, :, :6], v[:, :, 6:]],
                         key_padding_mask=mask, causal=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(forward_backward(compiled, q, k, v, dout), forward_backward(fn, q, k, v, dout)):
        torch.testing.assert_close(a, b)


def _bad(**over):
    q = torch.randn(2, 2, 4, 16)
    kw = dict(q=q, k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16))
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (_bad(q=torch.randn(2, 4, 16)), "q must be"),
        (_bad(q=torch.randn(2, 2, 4, 12), k=torch.randn(2, 2, 5, 12), v=torch.randn(2, 2, 5, 12)), "D=12"),
        (_bad(q=torch.randn(1, 1, 4, 136), k=torch.randn(1, 1, 5, 136), v=torch.randn(1, 1, 5, 136)), "D=136"),
        (_bad(q=torch.randn(2, 2, 4, 16).int()), "q must be float"),
        (_bad(k=torch.randn(2, 2, 5, 16).double()), "k has dtype"),
        (_bad(v=torch.randn(2, 3, 5, 16)), "v must be"),
        (_bad(k=[torch.randn(2, 2, 2, 16), torch.randn(2, 2, 3, 8)]), r"k\[1\] must be"),
        (_bad(k=[]), "non-empty"),
        (_bad(v=torch.randn(2, 2, 6, 16)), "same chunk lengths"),
        (_bad(key_padding_mask=torch.ones(2, 5)), "bool"),
        (_bad(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), r"shape \(2, 5\)"),
        (_bad(scale=float("nan")), "scale"),
        (_bad(causal=1), "causal"),
        (_bad(backend="fast"), "backend must be"),
    ],
)
def test_bad_inputs(kwargs, match):
    kwargs = dict(kwargs)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_unavailable_or_float64_kernels_say_why():
    q = torch.randn(1, 1, 4, 16)
    unavailable = [name for name, (ok, _) in status("cpu").items() if not ok]
    for name in unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
            attention(q, q, q, backend=name)
    for name in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match="not float64"):
            attention(q.double(), q.double(), q.double(), backend=name)


def test_auto_picks_sdpa_on_cpu_never_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 4, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert which_backend(q.to(dtype), q.to(dtype), q.to(dtype))[0] == "sdpa"
    meta = q.to("meta")
    assert which_backend(meta, meta, meta)[0] == "torch"


def test_cpu_is_sdpa(gen):
    """backend="cpu", the name users have, runs the sdpa backend on CPU tensors."""
    q, k, v, mask = make(gen, 2, 2, 9, 13, 32, padded=True, dtype=torch.float32)
    assert which_backend(q, k, v, backend="cpu")[0] == "sdpa"
    for a, b in zip(attention(q, k, v, key_padding_mask=mask, causal=True, backend="cpu"),
                    attention(q, k, v, key_padding_mask=mask, causal=True, backend="sdpa")):
        assert torch.equal(a, b)


def test_multihead_attention(gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    B, L, Lk, dim, heads, kv_dim = 2, 7, 11, 64, 4, 24
    mha = MultiheadAttention(dim, heads, kv_dim=kv_dim).double()
    x = torch.randn(B, L, dim, generator=gen, dtype=torch.float64)
    ctx = torch.randn(B, Lk, kv_dim, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, Lk, generator=gen) > 0.3
    out = mha(x, ctx, key_padding_mask=mask, causal=True)
    assert out.shape == (B, L, dim)

    def heads_of(t):
        return t.view(B, -1, heads, dim // heads).transpose(1, 2)

    q = heads_of(x @ mha.q_proj.weight.T + mha.q_proj.bias)
    k = heads_of(ctx @ mha.k_proj.weight.T + mha.k_proj.bias)
    v = heads_of(ctx @ mha.v_proj.weight.T + mha.v_proj.bias)
    o = attention_reference(q, k, v, mask, True).transpose(1, 2).reshape(B, L, dim)
    torch.testing.assert_close(out, o @ mha.out_proj.weight.T + mha.out_proj.bias)
    # context given as chunks, and self-attention
    torch.testing.assert_close(mha(x, [ctx[:, :4], ctx[:, 4:]], key_padding_mask=mask, causal=True), out)
    self_mha = MultiheadAttention(dim, heads, qkv_bias=False).double()
    assert self_mha(x).shape == (B, L, dim) and self_mha.q_proj.bias is None
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_lse(gen, backend):
    """The op's second output is differentiable too (delta = rowsum(dout * out) - grad_lse)."""
    q, k, v, mask = make(gen, 2, 2, 9, 13, 32, padded=True, dtype=torch.float32)
    mask[1, :] = False  # batch row 1 has no key: lse = -inf there, with zero gradient
    w_out = torch.randn(q.shape, generator=gen)
    w_lse = torch.randn(q.shape[:3], generator=gen)

    def loss(fn, *t):
        out, lse = fn(*t)
        return (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0.0).sum()

    def ours(q, k, v):
        return torch.ops.selfboottok.attention(q, [k], [v], mask, True, 0.2, backend)

    def ref(q, k, v):
        return attention_reference(q, k, v, mask, True, 0.2, return_lse=True)

    args = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(loss(ref, *args), args)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(loss(ours, *args), args)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)
