"""The CUDA attention kernels (csrc/attention/attention_kernels.cuh) compiled as host C++ against
a CUDA emulator (tests/cuda_emu) and run on CPU tensors, against the float64 reference with
FlashAttention's error rule (tests/_attention_checks.py).

What this catches: indexing, strides, chunk walking, masking, causal bounds, tail tiles, head-dim
padding, the online softmax and the backward maths; output elements never written (outputs
start as NaN), reads of unloaded shared memory (starts as NaN) or of padding past D (the strided
inputs are NaN there); barriers not reached by the whole block or warp; WMMA pointer alignment and
ldm rules. The emulated threads switch only at barriers, in a random order each round, so a
missing barrier usually shows as a wrong result.

What it cannot catch: the real WMMA fragment layouts and tensor-core rounding, races the barrier
order hides, memory ordering, shared-memory limits at launch (only the sizes are checked against
the sm80 budget here), bank conflicts, register spills, or speed. tests/test_attention_cuda.py
runs the same checks on a GPU.
"""

import tempfile
from pathlib import Path

import pytest
import torch

from _attention_checks import check_flash_rule
from selfboottok.ops._torch_impl import attention_allowed, attention_reference

ROOT = Path(__file__).resolve().parents[1]
SM80_SMEM_OPTIN = 163 * 1024
NAN = float("nan")

# (B, H, Lq, chunk lengths, D, mask, causal, layout)
CASES = [
    (1, 2, 17, [17], 64, None, False, "contiguous"),
    (2, 1, 33, [257], 128, "random", False, "strided"),
    (2, 2, 33, [17], 32, None, True, "strided"),  # Lq > Lk: the first rows see no key
    (2, 2, 17, [33], 40, "empty_row", True, "misaligned"),  # Lq < Lk
    (1, 2, 7, [1], 72, None, False, "contiguous"),
    (2, 1, 20, [5, 0, 28], 64, "random", True, "strided"),
    (2, 1, 70, [16, 1, 47, 3], 128, "empty_row", False, "misaligned"),  # two query tiles
    (1, 1, 9, [70, 0], 8, None, True, "strided"),  # two key tiles of one chunk
    (1, 1, 130, [130], 64, None, True, "contiguous"),  # the diagonal crosses tiles
    (2, 2, 21, [7, 30], 24, "random", False, "mixed"),
]
# layouts of q, k, v, dout for the "mixed" case
MIXED = {"q": "strided", "k": "contiguous", "v": "misaligned", "dout": "misaligned"}


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = Path(tempfile.gettempdir()) / "selfboottok_cuda_emu"
    build.mkdir(exist_ok=True)
    module = load(
        name="sbt_attention_emu",
        sources=[str(ROOT / "tests" / "cuda_emu" / "attention_emu.cpp"), str(ROOT / "csrc" / "arg_checks.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_emu")],
        extra_cflags=["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        build_directory=str(build),
    )
    module.set_workers(2)
    return module


def layout(x, kind, device="cpu"):
    """x [B,H,L,D] on `device`: contiguous, or a transposed [B,L,H,D] view whose rows continue
    with NaN (and start one element off 16-byte alignment for "misaligned")."""
    if kind == "contiguous":
        return x.to(device).contiguous()
    B, H, L, D = x.shape
    o = 1 if kind == "misaligned" else 0
    buf = torch.full((B, L, H, D + 8), NAN, dtype=x.dtype, device=device)
    buf[..., o : o + D] = x.transpose(1, 2).to(device)
    return buf[..., o : o + D].transpose(1, 2)


def make_mask(gen, kind, B, Lk):
    if kind is None:
        return None
    mask = torch.rand(B, Lk, generator=gen) > 0.3
    mask[:, 0] = True
    if kind == "empty_row":
        mask[-1] = False
    return mask


def reference(q, k, v, mask, causal, scale, dout, glse, upcast):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q, k, v, mask, causal, scale, upcast=upcast, return_lse=True)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    loss = (out.double() * dout).sum() + (finite.double() * glse).sum()
    return (out, *torch.autograd.grad(loss, (q, k, v))), lse


def case_id(c):
    return f"B{c[0]}H{c[1]}-Lq{c[2]}-Lk{c[3]}-D{c[4]}-{c[5]}-{'causal' if c[6] else 'full'}-{c[7]}"


def check_case(fwd, bwd, gen, case, dtype, device="cpu"):
    """Runs fwd/bwd (the signatures of attention_{fwd,bwd}_kernel) and the references on
    `device` and checks the kernels; the loss is out.dout + lse.glse."""
    B, H, Lq, lens, D, mask_kind, causal, kind = case
    Lk = sum(lens)
    q64, k64, v64 = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk))
    dout = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64).to(device)
    glse = torch.randn(B, H, Lq, generator=gen, dtype=torch.float64).to(device)
    mask = make_mask(gen, mask_kind, B, Lk)
    mask = None if mask is None else mask.to(device)
    scale = D**-0.5 * (1.5 if causal else 1.0)
    # the float64 reference sees the same rounded inputs as the kernels
    q, k, v = (t.to(dtype).to(device) for t in (q64, k64, v64))
    ref, ref_lse = reference(*(t.double() for t in (q, k, v)), mask, causal, scale, dout, glse, True)
    base, base_lse = reference(q, k, v, mask, causal, scale, dout, glse, False)

    cuts = torch.tensor([0] + lens).cumsum(0).tolist()
    kinds = MIXED if kind == "mixed" else dict.fromkeys(MIXED, kind)
    ks = [layout(k[:, :, a:b], kinds["k"], device) for a, b in zip(cuts, cuts[1:])]
    vs = [layout(v[:, :, a:b], kinds["v"], device) for a, b in zip(cuts, cuts[1:])]
    qs, dos = layout(q, kinds["q"], device), layout(dout.to(dtype), kinds["dout"], device)
    out, lse = fwd(qs, ks, vs, mask, causal, scale)
    delta = (dos.float() * out.float()).sum(-1) - glse.float()
    dq, dks, dvs = bwd(qs, ks, vs, mask, causal, scale, out, lse, dos, delta)
    for c, L in enumerate(lens):
        for t in (dks[c], dvs[c]):
            assert t.shape == (B, H, L, D) and t.is_contiguous() and t.dtype == dtype
    got = (out, dq, torch.cat(dks, 2), torch.cat(dvs, 2))

    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq) and lse.is_contiguous()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not torch.isnan(lse).any()
    names = ("out", "dq", "dk", "dv")
    for name, g in zip(names, got):
        assert g.dtype == dtype and g.is_contiguous(), name
    errors = check_flash_rule(dtype, dict(zip(names, got)), dict(zip(names, base)), dict(zip(names, ref)))
    fin = torch.isfinite(ref_lse)
    if fin.any():
        errors.update(check_flash_rule(dtype, {"lse": lse[fin]}, {"lse": base_lse[fin]}, {"lse": ref_lse[fin]}))

    # rows with no allowed key, and keys no query sees, are exactly zero
    allowed = attention_allowed(mask, causal, Lq, Lk, device)
    if allowed is not None:
        allowed = allowed.expand(B, H, Lq, Lk)
        empty_rows, unseen_keys = ~allowed.any(-1), ~allowed.any(-2)
        assert (out[empty_rows] == 0).all() and (dq[empty_rows] == 0).all()
        assert torch.isinf(lse[empty_rows]).all()
        assert (got[2][unseen_keys] == 0).all() and (got[3][unseen_keys] == 0).all()
    return {name: e / budget for name, (e, budget) in errors.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(emu, gen, case, dtype):
    check_case(emu.fwd, emu.bwd, gen, case, dtype)


def test_shared_memory_fits_sm80(emu):
    sizes = dict(emu.smem_bytes())
    assert len(sizes) == 18
    for name, size in sizes.items():
        assert 0 < size <= SM80_SMEM_OPTIN, name


def bad_kernel_arguments(gen, device):
    """(op, message pattern, args): attention_{fwd,bwd}_kernel calls with one bad argument each,
    on `device` tensors (a tensor on another device: meta, or cpu for cuda)."""
    q, k, v = (torch.randn(2, 2, L, 16, generator=gen).to(device, torch.float16) for L in (5, 7, 7))
    other = "cpu" if device == "cuda" else "meta"
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    fwd = [
        ("q must be", q[0], [k], [v], None, False, 1.0),
        ("head dim", q[..., :12], [k[..., :12]], [v[..., :12]], None, False, 1.0),
        ("1 to 4 chunks", q, [k] * 5, [v] * 5, None, False, 1.0),
        ("k has 2 chunks but v has 1", q, [k, k], [v], None, False, 1.0),
        (r"v\[0\] must be \[B, H, L, D\] = \[2, 2, 7, 16\]", q, [k], [v[:, :, :3]], None, False, 1.0),
        (r"k\[0\] has dtype", q, [k.float()], [v], None, False, 1.0),
        ("float32, float16 or bfloat16", q.double(), [k.double()], [v.double()], None, False, 1.0),
        (rf"k\[0\] is on {other}", q, [k.to(other)], [v], None, False, 1.0),
        ("stride 1 along D", q, [k.transpose(-1, -2).contiguous().transpose(-1, -2)], [v], None, False, 1.0),
        (r"key_padding_mask must be \[B, Lk\]", q, [k], [v], mask[:, :6], False, 1.0),
        ("key_padding_mask must be bool", q, [k], [v], mask.float(), False, 1.0),
        ("key_padding_mask must be contiguous", q, [k], [v], mask.repeat(1, 2)[:, ::2], False, 1.0),
        ("scale must be finite", q, [k], [v], None, False, float("inf")),
    ]
    if device != "cuda":  # a CUDA op called with CPU tensors never reaches its checks
        fwd.append((f"q must be a {device} tensor", q.to(other), [k], [v], None, False, 1.0))
    out = torch.zeros_like(q)
    lse = torch.zeros(2, 2, 5, device=device)
    base = (q, [k], [v], None, False, 1.0)
    bwd = [
        (r"out must be \[B, H, L, D\]", *base, out[:, :, :4], lse, out, lse),
        ("dout has dtype", *base, out, lse, out.float(), lse),
        ("lse must be float32", *base, out, lse.half(), out, lse),
        (r"delta must be \[B, H, Lq\]", *base, out, lse, out, lse[:, :, :2]),
        ("lse must be contiguous", *base, out, lse.transpose(0, 1).contiguous().transpose(0, 1), out, lse),
    ]
    return ([("attention_fwd_kernel", match, args) for match, *args in fwd]
            + [("attention_bwd_kernel", match, args) for match, *args in bwd])


def test_bad_arguments(emu, gen):
    """The kernels' argument checks (csrc/arg_checks.cpp, host-compiled), on CPU tensors: each bad
    argument is a ValueError that names it."""
    ops = {"attention_fwd_kernel": emu.fwd, "attention_bwd_kernel": emu.bwd}
    for op, match, args in bad_kernel_arguments(gen, "cpu"):
        with pytest.raises(ValueError, match=match):
            ops[op](*args)
