"""Helpers shared by the benchmark scripts in bench/ (machine name, timing, result files)."""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# lets `python /elsewhere/bench/x.py` import the checkout when selfboottok is not installed
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def timed(fn, repeats, sync, warmup=1):
    """Median wall time in seconds of `fn()` over `repeats` runs after `warmup` runs, and the
    last result."""
    for _ in range(warmup):
        fn()  # JIT, autotune, allocator
    sync()
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def machine_slug(machine: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")[:60]


def write_results(out_dir: Path, op: str, machine: str, payload: dict, table: str) -> tuple[Path, Path]:
    """Writes `<op>-<machine>.json` (payload) and `.md` (table) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{op}-{machine_slug(machine)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2))
    md_path.write_text(table + "\n")
    return json_path, md_path
