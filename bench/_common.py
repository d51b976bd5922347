"""Helpers shared by the benchmark scripts in bench/ (machine name, timing, result files)."""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
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


_T0 = time.time()


def elapsed() -> float:
    return time.time() - _T0


def log(msg):
    m, s = divmod(int(elapsed()), 60)
    print(f"[{m:3d}:{s:02d}] {msg}", flush=True)


def mean_std(values):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits=2):
    m, s = mean_std(values)
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def train_cached(stage, config, out, dataset, data_name, steps, init=None, parts=None) -> Path:
    """Trains a stage into `out` and returns its model folder; a finished run with the same
    settings there (its done.json) is reused instead."""
    from selfboottok.training import train_stage1, train_stage2

    key = {"stage": stage, "config": config.to_dict(), "data": data_name, "n": len(dataset),
           "steps": steps, "init": str(Path(init).resolve() if init is not None else None), "parts": parts}
    done = Path(out) / "done.json"
    if done.is_file() and json.loads(done.read_text()) == key:
        log(f"  reusing {out}")
        return Path(out) / "model"
    if stage == "stage1":
        train_stage1(config, out, dataset=dataset, total_steps=steps)
    else:
        train_stage2(config, init, out, dataset=dataset, total_steps=steps,
                     **({"parts": parts} if parts else {}))
    done.write_text(json.dumps(key))
    return Path(out) / "model"
