"""FlashAttention's error rule, shared by every attention test: a backend in a low-precision dtype
may be at most twice as far from the float64 result as the same maths done in that dtype, plus a
floor for values the reference gets exactly (with Lk = 1, dk is exactly 0)."""

import torch

# times the largest reference value of the checked group. float32: kernels sum in another order
# than torch's blocked matmul (sequentially under the Triton interpreter), which alone costs
# about 1e-5 of the largest value on some seeds.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def check_flash_rule(dtype, got, base, ref):
    """got, base (the same maths in `dtype`) and ref (float64): dicts name -> tensor. Asserts
    max|got - ref| <= 2 max|base - ref| + FLOOR[dtype] * (largest |ref| of the group) for each
    name, and that got is finite; returns name -> (error, budget)."""
    floor = FLOOR[dtype] * max(r.abs().max().item() for r in ref.values() if r.numel())
    out = {}
    for name, r in ref.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name} is not finite"
        out[name] = (max_err(g, r), 2 * max_err(base[name], r) + floor)
    print({name: f"{e:.2e} / {budget:.2e}" for name, (e, budget) in out.items()})
    for name, (e, budget) in out.items():
        assert e <= budget, (name, e, budget)
    return out
