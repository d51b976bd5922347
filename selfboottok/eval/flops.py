"""Generator compute, counted on the meta device (no memory, any preset)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfboottok.models import build_generator

__all__ = ["generator_flops", "count_flops"]


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def generator_flops(config, kind: Optional[str] = None) -> int:
    """Forward FLOPs per sample of one pass of the generator over its whole token sequence
    (K_g tokens in SelfBootTok mode, K_g + K_l in baseline mode, plus the class token).
    MaskGIT sampling costs `steps` such passes; AR with a KV cache about one.

    `kind` is "maskgit" or "ar" (default: the config's first generator)."""
    kind = config.generators[0] if kind is None else kind
    if kind not in ("maskgit", "ar"):
        raise ValueError(f"kind must be 'maskgit' or 'ar', got {kind!r}")
    with torch.device("meta"):
        model = build_generator(kind, config)
        T = config.num_quantized
        ids = torch.zeros(1, T if kind == "maskgit" else T - 1, dtype=torch.long)
        labels = torch.zeros(1, dtype=torch.long)
    return count_flops(model, ids, labels)
