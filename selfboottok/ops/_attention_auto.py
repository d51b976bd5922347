"""How `attention(..., backend="auto")` picks a backend for CUDA tensors, and why.

The rule: `sdpa` (PyTorch's fused kernels) unless a kernel of ours was measured faster than
`sdpa` on every shape measured for the call's (GPU, dtype, head dim, shape class, causal, pass).
The measurements come from `attention_table.json` (written by `bench/attention.py
--write-table`), or, with in-process timing switched on (`set_benchmark(True)` or
SELFBOOTTOK_ATTENTION_BENCHMARK=1, as torch.backends.cudnn.benchmark does), from one timing of
each candidate per key on the call's own shapes. Timing is skipped while
torch.use_deterministic_algorithms is on: the choice must not depend on a run's noise. With no
measurement, `sdpa` runs.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

TABLE_PATH = Path(__file__).with_name("attention_table.json")
KERNELS = ("cuda", "triton")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
SHORT, MEDIUM = 512, 2048  # longest of Lq, Lk: short <= 512 < medium <= 2048 < long


class Key(NamedTuple):  # a tuple, so that torch.compile traces the lookups
    gpu: str
    dtype: str  # bf16 | fp16 | fp32 | fp64
    head_dim: int  # 64 (D <= 64) or 128
    shape_class: str  # short | medium | long
    causal: bool
    passes: str  # fwd | fwd+bwd

    def __str__(self):
        causal = "causal" if self.causal else "full"
        return f"{self.gpu}, {self.dtype}, D<={self.head_dim}, {self.shape_class}, {causal}, {self.passes}"


def shape_class(Lq: int, Lk: int) -> str:
    L = max(Lq, Lk)
    return "short" if L <= SHORT else "medium" if L <= MEDIUM else "long"


def key_for(gpu: str, dtype: torch.dtype, D: int, Lq: int, Lk: int, causal: bool, backward: bool) -> Key:
    return Key(gpu, DTYPE_NAMES[dtype], 64 if D <= 64 else 128, shape_class(Lq, Lk), bool(causal),
               "fwd+bwd" if backward else "fwd")


_state: dict = {"table": None, "benchmark": os.environ.get("SELFBOOTTOK_ATTENTION_BENCHMARK") == "1",
                "timed": {}}


def entries_from_json(data: dict) -> dict[Key, dict[str, list[float]]]:
    """Key -> backend -> ms per measured shape (same shape order for every backend)."""
    out = {}
    for e in data.get("entries", []):
        key = Key(e["gpu"], e["dtype"], int(e["head_dim"]), e["shape_class"], bool(e["causal"]), e["pass"])
        out[key] = {name: list(ms) for name, ms in e["ms"].items()}
    return out


def table() -> dict[Key, dict[str, list[float]]]:
    if _state["table"] is None:
        _state["table"] = entries_from_json(json.loads(TABLE_PATH.read_text())) if TABLE_PATH.is_file() else {}
    return _state["table"]


def set_table(entries: Optional[dict]) -> None:
    """Replaces the measurements (a dict Key -> backend -> ms list, e.g. in tests); None reloads
    attention_table.json."""
    _state["table"] = entries


def set_benchmark(enabled: bool) -> None:
    """In-process timing of the candidates, once per key; off by default."""
    _state["benchmark"] = bool(enabled)
    _state["timed"].clear()


def benchmark_enabled() -> bool:
    return _state["benchmark"] and not torch.are_deterministic_algorithms_enabled()


def _best(rows: dict, available: list[str]) -> tuple[str, dict[str, float]]:
    """(the winner, kernel -> its worst speed-up over sdpa across the key's shapes)."""
    best, best_ratio, ratios = "sdpa", 1.0, {}
    for name in available:
        if len(rows.get(name, ())) != len(rows["sdpa"]):
            continue
        ratios[name] = min(s / t for s, t in zip(rows["sdpa"], rows[name]))
        if ratios[name] > best_ratio:
            best, best_ratio = name, ratios[name]
    return best, ratios


def pick(key: Key, available: list[str]) -> str:
    """choose's backend from the table alone, without the explanation (torch.compile traces it)."""
    rows = table().get(key)
    return "sdpa" if rows is None or "sdpa" not in rows else _best(rows, available)[0]


def choose(key: Key, available: list[str], measure: Optional[Callable[[str], float]] = None) -> tuple[str, str]:
    """(backend, why) among `sdpa` and the `available` kernels. `measure(name)` -> ms times one
    candidate on the call's shapes; given (timing on), each key is timed once and cached."""
    if measure is not None:
        if key not in _state["timed"]:
            _state["timed"][key] = {name: [measure(name)] for name in ("sdpa", *available)}
        rows, source = _state["timed"][key], "timed in this process"
    else:
        rows, source = table().get(key), "attention_table.json"
    if rows is None or "sdpa" not in rows:
        return "sdpa", f"no measurement for ({key}) in {source}: sdpa"
    best, ratios = _best(rows, available)
    measured = ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()) or "no kernel of ours measured"
    if best == "sdpa":
        return "sdpa", f"({key}) {source}: {measured} of sdpa, none faster: sdpa"
    return best, f"({key}) {source}: {measured} of sdpa: {best} is faster"


def time_ms(fn: Callable[[], None], repeats: int = 5) -> float:
    """Median ms of `fn` on the current CUDA stream, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def report(gpu: Optional[str]) -> list[str]:
    """What auto picks for each measured key of `gpu` (every GPU in the table when None)."""
    entries = table()
    gpus = sorted({k.gpu for k in entries}) if gpu is None else [gpu]
    lines = []
    if benchmark_enabled():
        lines.append("in-process timing on (SELFBOOTTOK_ATTENTION_BENCHMARK): keys are timed once per process")
    for g in gpus:
        keys = sorted((k for k in entries if k.gpu == g), key=str)
        if not keys:
            lines.append(f"{g}: no measurements in attention_table.json, so auto picks sdpa for every call")
        for k in keys:
            lines.append(choose(k, list(KERNELS))[1])
    lines.append("any call without a measurement: sdpa")
    return lines
