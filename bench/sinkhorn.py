"""Batched Sinkhorn: every available backend side by side with POT, in one run.

    python bench/sinkhorn.py                      # B=256, N=256, M=64, eps 0.05 and 0.005, fp32
    python bench/sinkhorn.py --B 64 --repeats 3   # quicker
    python bench/sinkhorn.py --eps 0.05 --rounds 3 --no-pot-loop   # the committed CPU comparison

Without POT (e.g. on a GPU machine) the torch reference backend is the baseline instead.

Two settings per eps: a fixed iteration count (everyone runs exactly --iters iterations) and
equal accuracy (ours stop each problem at row-marginal L1 error <= --target; POT's batch solver
runs the iteration count our slowest problem needed, so it reaches the same accuracy). Reports
the median wall time, the speed-up over POT's ot.solve_batch(method="log_sinkhorn"), and the
achieved marginal error of every method (the worse of the row and column L1 errors). With
--rounds R every cell is timed in R interleaved rounds (round 1 times all cells, then round 2...)
after one untimed round, each speed-up taken within its round; the table gives the median over
rounds and each round's speed-up (the spread). Writes bench/results/sinkhorn-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_name, timed, write_results  # noqa: E402

from selfboottok.ops import backend_status, sinkhorn  # noqa: E402

BASELINE = "POT solve_batch"


def marginal_error(plan, a, b):
    """max over problems of max(||P1 - a||_1, ||P^T 1 - b||_1): fair to solvers that end on
    either update."""
    rows = (plan.sum(-1) - a).abs().sum(-1)
    cols = (plan.sum(-2) - b).abs().sum(-1)
    return float(torch.maximum(rows, cols).max())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--N", type=int, default=256)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.005])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--target", type=float, default=1e-4, help="row-marginal L1 error to reach")
    p.add_argument("--max-iters", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all cells (the spread)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-pot-loop", action="store_true", help="skip the slow per-problem POT loop")
    p.add_argument("--pot-loop-problems", type=int, default=32,
                   help="problems the POT loop solves; its time is scaled to B (problems are independent)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    try:
        import ot
    except ImportError:
        ot = None

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    backends = [b for b, (ok, _) in backend_status(device).items() if ok]
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(args.B, args.N, args.M, generator=gen).to(device)  # cost range ~1
    a = torch.full((args.B, args.N), 1.0 / args.N, device=device)
    b = torch.full((args.B, args.M), 1.0 / args.M, device=device)
    machine = machine_name(device)
    pot_version = ot.__version__ if ot else "not installed"
    print(f"# Sinkhorn, B={args.B} N={args.N} M={args.M} fp32 on {machine}; POT {pot_version}, torch {torch.__version__}")

    baseline = BASELINE if ot is not None else "torch"
    if args.rounds > 1:  # an untimed round first: the first pass over every cell ran slower on every method
        measure_round(args, ot, backends, cost, a, b, sync, pot_loop=False)
    rounds = [measure_round(args, ot, backends, cost, a, b, sync, pot_loop=r == 0) for r in range(args.rounds)]
    rows = []
    for (eps, mode, method), (_, err, iters) in rounds[0].items():
        times = [rd[eps, mode, method][0] for rd in rounds if (eps, mode, method) in rd]
        speedups = [rd[eps, mode, baseline][0] / rd[eps, mode, method][0]
                    for rd in rounds if (eps, mode, method) in rd]
        rows.append(dict(eps=eps, mode=mode, method=method, ms=statistics.median(times) * 1e3,
                         speedup=statistics.median(speedups), speedups=speedups,
                         ms_per_round=[t * 1e3 for t in times], max_marginal_error=err, iters=iters))

    isa = cpu_isa() if device == "cpu" else None
    lines = [
        f"Sinkhorn, B={args.B}, N={args.N}, M={args.M}, float32, on {machine}"
        + (f" (cpu backend: {isa})" if isa else "") + ". "
        f"Each cell: median of {args.repeats} runs after a warm-up, in each of {args.rounds} interleaved "
        f"round(s){' after an untimed one' if args.rounds > 1 else ''} (POT loop: one run, first round only); "
        f"ms and speed-up are the medians over rounds, "
        f"'per round' lists each round's speed-up. "
        f"Speed-ups are against {BASELINE if ot is not None else 'the torch reference backend'}. "
        f"'fixed' = {args.iters} iterations; 'accuracy' = row-marginal L1 error <= {args.target:g}.",
        "",
        "| eps | mode | method | iters | median ms | speed-up | per round | max marginal error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_round = ", ".join(f"{x:.1f}x" for x in r["speedups"])
        lines.append(f"| {r['eps']:g} | {r['mode']} | {r['method']} | {r['iters']} | {r['ms']:.1f} | "
                     f"{r['speedup']:.1f}x | {per_round} | {r['max_marginal_error']:.2e} |")
    table = "\n".join(lines)
    print(table)
    meta = dict(machine=machine, device=device, torch=torch.__version__, pot=pot_version, cpu_isa=isa,
                B=args.B, N=args.N, M=args.M, iters=args.iters, target=args.target, repeats=args.repeats,
                rounds=args.rounds)
    write_results(args.out, "sinkhorn", machine, dict(meta=meta, rows=rows), table)


def measure_round(args, ot, backends, cost, a, b, sync, pot_loop):
    """(eps, mode, method) -> (seconds, max marginal error, iterations) of one round."""
    out = {}
    device = cost.device.type
    for eps in args.eps:
        for mode in ("fixed", "accuracy"):
            tol = None if mode == "fixed" else args.target
            n_max = args.iters if mode == "fixed" else args.max_iters
            needed = 0
            for backend in backends:
                t, res = timed(lambda: sinkhorn(cost, a, b, eps=eps, n_iters=n_max, tol=tol, backend=backend),
                               args.repeats, sync)
                out[eps, mode, backend] = (t, marginal_error(res.plan, a, b), int(res.n_iters.max()))
                needed = max(needed, int(res.n_iters.max()))
            pot_iters = args.iters if mode == "fixed" else needed
            if ot is not None:
                t, res = timed(lambda: ot.solve_batch(cost, reg=eps, a=a, b=b, max_iter=pot_iters, tol=0.0,
                                                      method="log_sinkhorn", reg_type="kl", grad="detach"),
                               args.repeats, sync)
                out[eps, mode, BASELINE] = (t, marginal_error(res.plan, a, b), pot_iters)
            if ot is not None and pot_loop and not args.no_pot_loop and device == "cpu":
                C, an, bn = cost.numpy(), a.numpy(), b.numpy()
                k = min(args.B, args.pot_loop_problems)
                start = time.perf_counter()
                plans = np.stack([ot.bregman.sinkhorn_log(an[i], bn[i], C[i], eps, numItermax=pot_iters,
                                                          stopThr=0.0, warn=False) for i in range(k)])
                t = (time.perf_counter() - start) * args.B / k
                err = marginal_error(torch.from_numpy(plans), a[:k], b[:k])
                out[eps, mode, f"POT loop (sinkhorn_log; {k} problems, time x{args.B / k:g})"] = (t, float(err), pot_iters)
    return out


def cpu_isa():
    from selfboottok.ops import _backend

    ext, _ = _backend.extension()
    return ext.cpu_isa() if ext is not None else None


if __name__ == "__main__":
    main()
