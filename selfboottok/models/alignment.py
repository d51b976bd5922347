"""Mapping 2D patch features onto the 1D local slots: optimal transport (the method), and the
baselines it is compared with (adaptive average pooling, softmax attention)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from selfboottok.ops import sinkhorn

__all__ = ["AlignmentOutput", "Alignment", "cosine_cost"]


class AlignmentOutput(NamedTuple):
    tokens: torch.Tensor  # [B, K, c]: each slot's weighted mean of the patch features
    plan: torch.Tensor  # [B, N, K], total mass 1 per image
    loss: torch.Tensor  # scalar, mean over the batch of <plan, cost>
    slot_mass: torch.Tensor  # [B, K], K * column sums: all ones when slots are used evenly


def cosine_cost(feats, slots):
    """C[b,n,k] = 1 - cos(feats[b,n], slots[b,k]), in float32 (float64 stays float64)."""
    f, t = _unit(feats, slots), _unit(slots, feats)
    return 1.0 - f @ t.transpose(1, 2)


def _unit(x, other):
    dtype = torch.float64 if torch.float64 in (x.dtype, other.dtype) else torch.float32
    return F.normalize(x.to(dtype), dim=-1)


class Alignment(nn.Module):
    """``mode="ot"``: plan = sinkhorn(C, a=1/N, b=1/K, eps); every slot gets an equal share.
    ``"softmax"``: each patch is split over the slots by softmax(-C / tau) (slots may collapse).
    ``"avgpool"``: slot k is the mean of the k-th contiguous segment of the patch sequence.
    The slot tokens are the plan's barycentric projection ``(P^T F) / (P^T 1)`` (``K P^T F``
    for OT)."""

    def __init__(self, mode="ot", eps=0.05, n_iters=50, tau=0.1):
        super().__init__()
        if mode not in ("ot", "softmax", "avgpool"):
            raise ValueError(f"mode must be 'ot', 'softmax' or 'avgpool', got {mode!r}")
        self.mode, self.eps, self.n_iters, self.tau = mode, eps, n_iters, tau

    def forward(self, feats, slots):
        B, N, _ = feats.shape
        K = slots.shape[1]
        # fp32 under autocast: the plan's exp(-C/eps) needs the precision, and sinkhorn takes fp32/64
        if not torch.amp.is_autocast_available(feats.device.type):  # e.g. meta
            return self._align(feats, slots, B, N, K)
        with torch.autocast(feats.device.type, enabled=False):
            return self._align(feats, slots, B, N, K)

    def _align(self, feats, slots, B, N, K):
        f, t = _unit(feats, slots), _unit(slots, feats)
        cost = 1.0 - f @ t.transpose(1, 2)
        if self.mode == "ot":
            plan = sinkhorn(cost, eps=self.eps, n_iters=self.n_iters).plan
        elif self.mode == "softmax":
            plan = torch.softmax(-cost / self.tau, dim=-1) / N
        else:
            plan = _pooling_plan(N, K, cost.dtype, cost.device).expand(B, N, K)
        mass = plan.sum(1)  # [B, K]
        tokens = (plan.transpose(1, 2) @ feats.to(plan.dtype)) / mass.clamp_min(1e-12)[..., None]
        # the loss moves the slots towards their patches, not the patch features towards each
        # other (which would collapse them all onto one direction)
        loss = (plan.detach() * (1.0 - f.detach() @ t.transpose(1, 2))).sum((1, 2)).mean()
        return AlignmentOutput(tokens.to(feats.dtype), plan, loss, mass * K)


def _pooling_plan(N, K, dtype, device):
    # adaptive_avg_pool1d's segments: slot k covers [floor(kN/K), ceil((k+1)N/K))
    plan = torch.zeros(N, K, dtype=dtype, device=device)
    for k in range(K):
        lo, hi = (k * N) // K, -((-(k + 1) * N) // K)
        plan[lo:hi, k] = 1.0 / (hi - lo)
    return (plan / K)[None]
