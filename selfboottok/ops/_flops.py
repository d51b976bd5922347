"""FLOP formulas of the attention custom ops, so that torch.utils.flop_counter counts them."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula


def attention_flops(q_shape, k_shapes) -> int:
    """4·B·H·Lq·Lk·D: the two matmuls of the forward; masks and causality are not subtracted,
    as for SDPA."""
    B, H, Lq, D = q_shape
    return 4 * B * H * Lq * sum(c[2] for c in k_shapes) * D


def register() -> None:
    """The backward does five matmuls to the forward's two: 2.5x its FLOPs."""

    def forward(q, k, *args, **kwargs):
        return attention_flops(q, k)

    def backward(q, k, *args, **kwargs):
        return attention_flops(q, k) * 5 // 2

    register_flop_formula(torch.ops.selfboottok.attention)(forward)
    register_flop_formula(torch.ops.selfboottok.attention_backward)(backward)
