"""Fused attention: every selfboottok backend side by side with PyTorch SDPA (each of its backends),
the FlashAttention package (when installed) and the naive reference, in one run.

    python bench/attention.py                         # cuda if present: full shapes, bf16
    python bench/attention.py --device cpu            # scaled-down shapes of the same families
    python bench/attention.py --shapes long --causal --dtype fp16

Shapes (full, the default on GPUs): local decoder B=256 H=12 Lq=256 Lk in {64,128,320} D=64, and
long sequences B=4 H=16 L=4096 D in {64,128}. On CPU the default is a scaled-down version (local
B=8 H=4, long B=1 H=2 L=1024), labelled as such; --full-size forces the full shapes.

Rows are shape x pass (fwd, fwd+bwd); cells are the median ms and TFLOP/s. FLOPs: fwd = 4*B*H*Lq*Lk*D
(two matmuls), halved when causal and Lq == Lk; fwd+bwd = 3.5 x fwd (the backward does five
matmuls to the forward's two). The last columns give the speed-up of each selfboottok backend over
the fastest SDPA backend of that row (>1 = faster). Methods that materialise the Lq x Lk scores
(naive reference, the `torch` / `cpu` backends, SDPA math) are skipped when their estimated memory
exceeds --mem-budget-gb. The JSON also holds each cell's max error against a float32 reference
on batch element 0 (out, and dq/dk/dv for fwd+bwd), relative to the reference's largest value.
Writes bench/results/attention-<machine>.{json,md}.

    python bench/attention.py --write-table           # also record this GPU's measurements for auto
    python bench/attention.py --table-from bench/results/attention-nvidia-h200.json

--write-table merges this run's CUDA measurements into selfboottok/ops/attention_table.json, which
`backend="auto"` reads: per (GPU, dtype, head dim <= 64 or 128, shape class, causal, pass) the ms
of sdpa and of each kernel of ours on every shape of the class (`sdpa` = the selfboottok:sdpa
backend, or the fastest torch SDPA backend when a run has no such column). --table-from does the
same from an earlier results file, without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_name, timed, write_results  # noqa: E402

from selfboottok.ops import _attention_auto  # noqa: E402
from selfboottok.ops._torch_impl import attention_allowed, attention_reference  # noqa: E402
from selfboottok.ops.attention import attention, status as attention_status  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FWD_BWD_FACTOR = 3.5

FULL_SHAPES = {
    "local": [(256, 12, 256, lk, 64) for lk in (64, 128, 320)],
    "long": [(4, 16, 4096, 4096, d) for d in (64, 128)],
}
CPU_SHAPES = {
    "local": [(8, 4, 256, lk, 64) for lk in (64, 128, 320)],
    "long": [(1, 2, 1024, 1024, d) for d in (64, 128)],
}

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# live Lq x Lk score-sized buffers, a rough upper bound (fwd; fwd+bwd)
SCORE_COPIES = {"fwd": 4, "fwd+bwd": 8}


@dataclass
class Method:
    name: str
    fn: Callable  # (q, k, v) in the method's layout -> out
    layout: str = "bhld"  # or "blhd" (flash_attn)
    context: Callable = contextlib.nullcontext  # entered around all of a cell's calls
    score_bytes: int = 0  # element size of materialised scores; 0 = tiled, no Lq x Lk buffer


def build_methods(device, dtype, causal, include_interpreted):
    methods, excluded = [], {}
    elsize = torch.empty((), dtype=dtype).element_size()
    for name, (ok, reason) in attention_status(device).items():
        if name == "cpu":  # the sdpa backend's former name
            continue
        if not ok:
            excluded[f"selfboottok:{name}"] = reason
            continue
        if name == "triton" and device == "cpu" and not include_interpreted:
            excluded["selfboottok:triton"] = "runs in the Triton interpreter on CPU (--include-interpreted)"
            continue
        # the torch reference works on float32 scores
        score = 4 if name == "torch" else 0
        methods.append(Method(f"selfboottok:{name}",
                              lambda q, k, v, b=name: attention(q, k, v, causal=causal, backend=b),
                              score_bytes=score))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for short, attr in SDPA_BACKENDS.items():
        be = getattr(SDPBackend, attr, None)
        if be is None:
            excluded[f"sdpa:{short}"] = f"SDPBackend.{attr} not in this torch"
            continue
        methods.append(Method(f"sdpa:{short}", lambda q, k, v: _sdpa(q, k, v, causal),
                              context=lambda be=be: sdpa_kernel(be),
                              score_bytes=4 if short == "math" else 0))

    try:
        from flash_attn import flash_attn_func
    except Exception as e:  # not installed, or built for another torch/CUDA
        excluded["flash_attn"] = f"not importable: {type(e).__name__}: {e}"
    else:
        methods.append(Method("flash_attn", lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
                              layout="blhd"))

    methods.append(Method("naive", lambda q, k, v: attention_reference(q, k, v, causal=causal, upcast=False),
                          score_bytes=elsize))
    return methods, excluded


def _sdpa(q, k, v, causal):
    Lq, Lk = q.shape[2], k.shape[2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal is top-left aligned when Lq != Lk; ours is bottom-right, so pass the mask
    mask = attention_allowed(None, True, Lq, Lk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def to_layout(x, layout):
    return x.transpose(1, 2).contiguous() if layout == "blhd" else x


def from_layout(x, layout):
    return x.transpose(1, 2) if layout == "blhd" else x


def run_pass(method, q, k, v, dout, backward):
    """One call of the method: the output, and the input gradients when `backward`."""
    if not backward:
        with torch.no_grad():
            return method.fn(q, k, v)
    out = method.fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


class Timer:
    """Seconds per call, one entry per sample. CUDA: events around `inner` back-to-back calls, with `inner`
    chosen so one sample lasts at least `min_sample_s`. CPU: wall time of single calls."""

    def __init__(self, device, repeats, warmup, max_cell_s, min_sample_s=2e-3):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.max_cell_s, self.min_sample_s = max_cell_s, min_sample_s

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn):
        # one timed warm-up call sizes the sample count and inner loop
        t1, _ = timed(fn, 1, self.sync, warmup=max(self.warmup, 1))
        repeats = max(1, min(self.repeats, int(self.max_cell_s / max(t1, 1e-9))))
        if self.device != "cuda":
            return [timed(fn, 1, self.sync, warmup=0)[0] for _ in range(repeats)], 1
        inner = max(1, min(100, math.ceil(self.min_sample_s / max(t1, 1e-9))))
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        return times, inner


def rel_error(got, ref, rows_ok):
    """max |got - ref| / max |ref| over the tensors, ignoring query rows with no allowed key."""
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.float(), r.float()
        if i < 2 and rows_ok is not None:  # out and dq are per query row
            g, r = g[..., rows_ok, :], r[..., rows_ok, :]
        if r.numel() == 0:
            continue
        err = float((g - r).abs().max()) / max(float(r.abs().max()), 1e-30)
        worst = max(worst, err) if math.isfinite(err) else float("nan")
        if math.isnan(worst):
            break
    return worst


def fmt_cell(cell):
    if cell.get("ms") is None:
        return cell["status"]
    return f"{cell['ms']:.3g} ms ({cell['tflops']:.3g})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--shapes", default="all", choices=["local", "long", "all"])
    p.add_argument("--full-size", action="store_true", help="full shapes even on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per cell (default cuda 20, cpu 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default cuda 3, cpu 2)")
    p.add_argument("--max-cell-seconds", type=float, default=20.0,
                   help="fewer samples for a cell whose calls are slow enough to exceed this")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip score-materialising methods that would need more (default: 80%% of free "
                        "GPU memory, or 50%% of available RAM)")
    p.add_argument("--include-interpreted", action="store_true",
                   help="also time the triton backend on CPU (Triton interpreter, very slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is steadier when other processes share the CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the error check against float32")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--write-table", nargs="?", type=Path, const=_attention_auto.TABLE_PATH, default=None,
                   metavar="PATH", help="merge the CUDA measurements into auto's table (default: %(const)s)")
    p.add_argument("--table-from", type=Path, metavar="RESULTS_JSON",
                   help="only write the table (--write-table's path) from an earlier results file")
    args = p.parse_args()
    if args.table_from is not None:
        data = json.loads(args.table_from.read_text())
        write_table(args.write_table or _attention_auto.TABLE_PATH, data["meta"], data["rows"], args.table_from)
        return

    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    repeats = args.repeats if args.repeats is not None else (20 if device == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 2)
    scaled = device == "cpu" and not args.full_size
    families = ["local", "long"] if args.shapes == "all" else [args.shapes]
    table_shapes = CPU_SHAPES if scaled else FULL_SHAPES
    shapes = [(fam, s) for fam in families for s in table_shapes[fam]]
    budget = args.mem_budget_gb * 1e9 if args.mem_budget_gb is not None else default_budget(device)

    methods, excluded = build_methods(device, dtype, args.causal, args.include_interpreted)
    timer = Timer(device, repeats, warmup, args.max_cell_seconds)
    machine = machine_name(device)
    gen = torch.Generator(device=device).manual_seed(0)
    size_note = "SCALED-DOWN shapes for CPU" if scaled else "full shapes"
    print(f"# attention, {args.dtype}, causal={args.causal}, {size_note}, on {machine}; torch {torch.__version__}")
    print(f"# methods: {', '.join(m.name for m in methods)}")

    meta = dict(
        op="attention", machine=machine, device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else machine,
        torch=torch.__version__, cuda=torch.version.cuda, dtype=args.dtype, causal=args.causal,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), complete=False,
        scaled_down=scaled, shapes=args.shapes, repeats=repeats, warmup=warmup,
        max_cell_seconds=args.max_cell_seconds, mem_budget_gb=round(budget / 1e9, 1),
        flash_attn=flash_attn_version(),
        flops="fwd = 4*B*H*Lq*Lk*D (halved when causal and Lq == Lk); fwd+bwd = 3.5 x fwd",
        timing=("median over samples; cuda: CUDA events around back-to-back calls (inner) after warm-up; "
                "cpu: wall time of single calls after warm-up"),
        sdpa_causal="is_causal=True when Lq == Lk, else an explicit bottom-right bool mask",
        layouts="[B,H,L,D] inputs; flash_attn gets [B,L,H,D] copies made outside the timing",
        error=("max |x - ref| / max |ref| on batch element 0 against attention_reference in float32; "
               "fwd: out, fwd+bwd: worst of out, dq, dk, dv; rows with no allowed key ignored; \"nan\" where "
               "the method gave NaN (e.g. SDPA with a mask, rows that see no key, in the backward)"),
        memory_estimate=(f"score-materialising methods need ~{SCORE_COPIES['fwd']} (fwd) or "
                         f"{SCORE_COPIES['fwd+bwd']} (fwd+bwd) x B*H*Lq*Lk x element size (float32 for the "
                         "torch/cpu backends and SDPA math); cuda cells record the measured peak_extra_gb"),
        selfboottok_status={n: dict(available=ok, reason=r) for n, (ok, r) in attention_status(device).items()},
        excluded=excluded,
    )
    others = OtherCpuUse() if device == "cpu" else None  # other processes skew CPU times

    rows = []
    for fam, (B, H, Lq, Lk, D) in shapes:
        q, k, v, dout = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
                         for L in (Lq, Lk, Lk, Lq))
        flops = 4 * B * H * Lq * Lk * D * (0.5 if args.causal and Lq == Lk else 1.0)
        refs = None if args.no_check else reference_slices(q, k, v, dout, args.causal)
        for pass_name in ("fwd", "fwd+bwd"):
            backward = pass_name == "fwd+bwd"
            pass_flops = flops * (FWD_BWD_FACTOR if backward else 1.0)
            cells = {}
            for m in methods:
                cells[m.name] = run_cell(m, q, k, v, dout, backward, pass_flops, budget, timer, refs, pass_name)
                c = cells[m.name]
                print(f"  {fam} B={B} H={H} Lq={Lq} Lk={Lk} D={D} {pass_name:7} {m.name:22} {fmt_cell(c)}",
                      flush=True)
            sdpa = {n: c["ms"] for n, c in cells.items() if n.startswith("sdpa:") and c.get("ms")}
            best = min(sdpa, key=sdpa.get) if sdpa else None
            speedups = {}
            for n, c in cells.items():
                if n.startswith("selfboottok:") and best and c.get("ms"):
                    speedups[n] = sdpa[best] / c["ms"]
            rows.append({"family": fam, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "pass": pass_name,
                         "flops": pass_flops, "cells": cells, "best_sdpa": best,
                         "speedup_vs_best_sdpa": speedups})
        del q, k, v, dout, refs
        if device == "cuda":
            torch.cuda.empty_cache()
        # after every shape, so a run cut short still leaves its rows
        table = markdown(meta, rows, [m.name for m in methods], excluded)
        write_results(args.out, "attention", machine, dict(meta=meta, rows=rows), table)

    meta["complete"] = True
    if others is not None:
        meta["other_processes_cpu_share"] = others.share()
    table = markdown(meta, rows, [m.name for m in methods], excluded)
    print()
    print(table)
    json_path, md_path = write_results(args.out, "attention", machine, dict(meta=meta, rows=rows), table)
    print(f"\nwrote {json_path} and {md_path}")
    if args.write_table is not None:
        write_table(args.write_table, meta, rows, json_path)


def table_entries(meta, rows, source):
    """auto's table entries from a run's rows: one per key, the ms of each backend on every shape
    of the key (a backend missing on some shape is left out of that entry)."""
    if meta["device"] != "cuda" or meta.get("scaled_down"):
        raise SystemExit("the auto table holds full-size CUDA measurements only")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[meta["dtype"]]
    groups = {}
    for r in rows:
        key = _attention_auto.key_for(meta["device_name"], dtype, r["D"], r["Lq"], r["Lk"], meta["causal"],
                                      r["pass"] == "fwd+bwd")
        groups.setdefault(key, []).append(r)
    entries = []
    for key, group in groups.items():
        ms, sdpa_is = {}, set()
        for r in group:
            cells = r["cells"]
            ours = cells.get("selfboottok:sdpa", {}).get("ms")
            if ours is None:
                ours = cells[r["best_sdpa"]]["ms"] if r["best_sdpa"] else None
                sdpa_is.add(f"fastest torch SDPA backend ({r['best_sdpa']})")
            else:
                sdpa_is.add("selfboottok:sdpa")
            times = {"sdpa": ours, **{n: cells.get(f"selfboottok:{n}", {}).get("ms") for n in _attention_auto.KERNELS}}
            for n, t in times.items():
                ms.setdefault(n, []).append(t)
        ms = {n: [round(t, 5) for t in ts] for n, ts in ms.items() if None not in ts}
        entries.append(dict(gpu=key.gpu, dtype=key.dtype, head_dim=key.head_dim, shape_class=key.shape_class,
                            causal=key.causal, **{"pass": key.passes},
                            shapes=[[r["B"], r["H"], r["Lq"], r["Lk"], r["D"]] for r in group], ms=ms,
                            sdpa_is=", ".join(sorted(sdpa_is)), source=str(source), date=meta["date"],
                            torch=meta["torch"]))
    return entries


def write_table(path, meta, rows, source):
    """Replaces the entries of this run's keys in the table at `path`, keeps the others."""
    path = Path(path)
    try:
        source = Path(source).resolve().relative_to(RESULTS.parent.parent)
    except ValueError:
        pass
    new = table_entries(meta, rows, source)
    fields = ("gpu", "dtype", "head_dim", "shape_class", "causal", "pass")
    replaced = {tuple(e[f] for f in fields) for e in new}
    old = json.loads(path.read_text())["entries"] if path.is_file() else []
    kept = [e for e in old if tuple(e[f] for f in fields) not in replaced]
    entries = sorted(kept + new, key=lambda e: tuple(str(e[f]) for f in fields))
    about = ("Measurements behind attention's backend='auto' on CUDA tensors (selfboottok/ops/_attention_auto.py): "
             "a kernel of ours is picked only where it is faster than sdpa on every shape listed. "
             "Written by bench/attention.py --write-table / --table-from.")
    lines = ",\n".join(f"  {json.dumps(e)}" for e in entries)  # one entry per line
    path.write_text(f'{{"about": {json.dumps(about)},\n "entries": [\n{lines}\n]}}\n')
    print(f"wrote {len(new)} entries to {path} ({len(entries)} in all)")


class OtherCpuUse:
    """Share of the machine's CPU time (all cores) that other processes used since creation."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy / hz, sum(ticks) / hz, t.user + t.system

    def share(self):
        end = self._read()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        others = (end[0] - self.start[0]) - (end[2] - self.start[2])
        return round(max(0.0, others) / (end[1] - self.start[1]), 3)


def default_budget(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.8 * free
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


def flash_attn_version():
    try:
        import flash_attn
    except Exception:
        return "not installed"
    return getattr(flash_attn, "__version__", "unknown")


def reference_slices(q, k, v, dout, causal):
    """Float32 reference on batch element 0: inputs, out, dq, dk, dv, and the rows that see a key."""
    q1, k1, v1, do1 = (x[:1].detach().float().requires_grad_(True) for x in (q, k, v, dout))
    out = attention_reference(q1, k1, v1, causal=causal)
    grads = torch.autograd.grad(out, (q1, k1, v1), do1)
    rows_ok = None
    if causal and q.shape[2] > k.shape[2]:
        rows_ok = attention_allowed(None, True, q.shape[2], k.shape[2], q.device)[0, 0].any(-1)
    inputs = tuple(x[:1].detach() for x in (q, k, v, dout))
    return dict(inputs=inputs, out=out.detach(), grads=[g.detach() for g in grads], rows_ok=rows_ok)


def run_cell(m, q, k, v, dout, backward, flops, budget, timer, refs, pass_name):
    B, H, Lq, _ = q.shape
    need = SCORE_COPIES[pass_name] * B * H * Lq * k.shape[2] * m.score_bytes
    if need > budget:
        return dict(status=f"skipped: needs {need / 1e9:.1f} GB", ms=None, tflops=None,
                    reason=f"estimated {need / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB")
    qm, km, vm, dm = (to_layout(x, m.layout) for x in (q, k, v, dout))
    if backward:
        qm, km, vm = (x.detach().requires_grad_(True) for x in (qm, km, vm))
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught, m.context():
            warnings.simplefilter("always")
            if timer.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times, inner = timer(lambda: run_pass(m, qm, km, vm, dm, backward))
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if timer.device == "cuda" else None
    except Exception as e:  # a backend that does not support this shape/dtype/device
        msgs = [str(w.message) for w in caught]
        reason = f"{type(e).__name__}: {e}".strip()
        if msgs:
            reason += " | warnings: " + " / ".join(dict.fromkeys(msgs))
        failed = dict(status="n/a", ms=None, tflops=None, reason=reason[:2000])
    else:
        failed = None
    if failed:
        if timer.device == "cuda":
            torch.cuda.empty_cache()  # after an OOM, once the traceback's tensors are gone
        return failed
    t = statistics.median(times)
    cell = dict(status="ok", ms=t * 1e3, tflops=flops / t / 1e12, samples_ms=[round(x * 1e3, 4) for x in times],
                inner=inner, max_rel_error=None)
    if need:
        cell["estimated_gb"] = round(need / 1e9, 3)
    if refs is not None:
        try:
            with m.context():
                cell["max_rel_error"] = check(m, refs, backward)
        except Exception as e:
            cell["check_failed"] = f"{type(e).__name__}: {e}"[:2000]
    if peak is not None:
        cell["peak_extra_gb"] = round(peak, 3)
    return cell


def check(m, refs, backward):
    q1, k1, v1, do1 = (to_layout(x, m.layout) for x in refs["inputs"])
    if backward:
        q1, k1, v1 = (x.clone().requires_grad_(True) for x in (q1, k1, v1))
    got = run_pass(m, q1, k1, v1, do1, backward)
    got = [from_layout(x, m.layout) for x in (got if backward else (got,))]
    ref = [refs["out"], *refs["grads"]] if backward else [refs["out"]]
    err = rel_error(got, ref, refs["rows_ok"])
    return "nan" if math.isnan(err) else err


def markdown(meta, rows, names, excluded):
    # columns that never ran (n/a in every row) are listed under the table instead
    ran = [n for n in names if any(r["cells"][n].get("ms") or r["cells"][n]["status"].startswith("skipped")
                                   for r in rows)]
    ours = [n for n in ran if n.startswith("selfboottok:")]
    size = ("**scaled down for CPU** (full shapes: local B=256 H=12 Lq=256, long B=4 H=16 L=4096)"
            if meta["scaled_down"] else "full shapes")
    load, share = "", meta.get("other_processes_cpu_share")
    if share is not None:
        load = f"; other processes used {100 * share:.0f}% of this machine's CPU time during the run"
    lines = [] if meta["complete"] else ["**Incomplete: the run stopped before the last shape.**", ""]
    if share is not None and share > 0.1:
        lines += ["**Other processes were busy on this CPU during the run: times are inflated and noisy.**", ""]
    lines += [
        f"Attention, {meta['dtype']}, causal={meta['causal']}, {size}, on {meta['device_name']}; "
        f"torch {meta['torch']}, flash_attn {meta['flash_attn']}, {meta['date']}.",
        "",
        f"Cells: median ms (TFLOP/s). FLOPs: {meta['flops']}. Median of up to {meta['repeats']} samples "
        f"after {meta['warmup']} warm-up calls{load}. `x vs SDPA` = fastest SDPA backend's time / that backend's "
        "time (>1 = faster). naive = attention_reference(upcast=False).",
        "",
        "| shape | pass | " + " | ".join(ran) + " | best SDPA | "
        + " | ".join(f"{n.split(':', 1)[1]} vs SDPA" for n in ours) + " |",
        "|" + "---|" * (3 + len(ran) + len(ours)),
    ]
    notes = {}
    for r in rows:
        shape = f"B{r['B']} H{r['H']} Lq{r['Lq']} Lk{r['Lk']} D{r['D']}"
        cells = []
        for n in ran:
            c = r["cells"][n]
            cells.append(fmt_cell(c))
            if c.get("ms") is None and c["status"] == "n/a":
                notes.setdefault((n, c["reason"].split(" | ")[0][:200]), []).append(f"{shape} {r['pass']}")
        sp = [f"{r['speedup_vs_best_sdpa'][n]:.2f}x" if n in r["speedup_vs_best_sdpa"] else "-" for n in ours]
        best = r["best_sdpa"].split(":", 1)[1] if r["best_sdpa"] else "-"
        lines.append(f"| {shape} | {r['pass']} | " + " | ".join(cells) + f" | {best} | " + " | ".join(sp) + " |")
    errs = {}
    for n in ran:
        es = [r["cells"][n].get("max_rel_error") for r in rows]
        if "nan" in es:
            errs[n] = "NaN in some rows"
        elif any(e is not None for e in es):
            errs[n] = f"{max(e for e in es if e is not None):.2e}"
    if errs:
        lines += ["", "Worst max relative error vs float32 reference (batch element 0, out and grads): "
                  + ", ".join(f"{n} {e}" for n, e in errs.items()) + "."]
    never = [n for n in names if n not in ran]
    if never or excluded:
        lines += ["", "Not run here:"]
        lines += [f"- {n}: {r['cells'][n]['reason'].split(' | ')[0][:200]}" for n in never for r in rows[:1]]
        lines += [f"- {n}: {reason}" for n, reason in excluded.items()]
    if notes:
        lines += ["", "n/a cells:"]
        lines += [f"- {n} ({', '.join(where)}): {reason}" for (n, reason), where in notes.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
