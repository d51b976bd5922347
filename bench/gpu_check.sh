#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no internet, its own torch): build the extension,
# run the GPU tests by name, run the GPU benchmarks. Each step has its own time limit so the run
# ends with whatever it got. Results and logs go to $RES (default bench/results); when $OUT is set
# (the device tool's output folder) they are also packed into $OUT/gpu_results.tar.gz.
#   gpu_tests.log           every test by name (-v), with the failures' tracebacks (-rfE)
#   gpu_test_failures.txt   the named list of failing or erroring tests (empty: none)
#   attention_table.json    auto's table with this GPU's measurements merged in: copy it to
#                           selfboottok/ops/ to commit it
# Usage: bash bench/gpu_check.sh            (PART=tests or PART=bench runs one half after the build,
#        for a device tool that limits one command to 10 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-bench/results}
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SELFBOOTTOK_CUDA=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
PART=${PART:-all}
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tar.gz" "$RES"; }
trap pack EXIT
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?; echo "== rc=$rc in $((SECONDS - t0))s"; return $rc; }

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, torch.version.cuda, 'triton', triton.__version__)"; } | tee "$RES/machine.txt"
step 280 $PY -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1 \
  || { echo "build failed; see build.log"; tail -40 "$RES/build.log"; exit 1; }
tail -3 "$RES/build.log"
$PY -m selfboottok.ops | tee "$RES/backends.txt"

if [ "$PART" != bench ]; then
# the GPU tests, by file or node id; the CPU-only tests of these files skip or run quickly
tests=(
  tests/test_attention_cuda.py
  tests/test_attention_sdpa.py
  tests/test_attention_triton.py
  tests/test_sinkhorn_gpu.py
  tests/test_sinkhorn_triton.py
  "tests/test_build.py::test_raw_kernel_ops_reject_bad_arguments"
)
opts=(-v -rfE -p no:cacheprovider)
# a per-test limit (pytest-timeout) and workers (pytest-xdist) when this machine has them
$PY -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 120)
$PY -c "import xdist" 2>/dev/null && opts+=(-n 8)
step 300 $PY -m pytest "${opts[@]}" "${tests[@]}" > "$RES/gpu_tests.log" 2>&1
# from the -v lines too, so that a run cut off by its limit still names its failures
grep -oE "(FAILED|ERROR) tests/[^ ]+" "$RES/gpu_tests.log" | sort -u > "$RES/gpu_test_failures.txt"
grep -E "passed|failed|node down|Timeout" "$RES/gpu_tests.log" | tail -5
echo "failing tests: $(wc -l < "$RES/gpu_test_failures.txt") (gpu_test_failures.txt)"
head -40 "$RES/gpu_test_failures.txt"
fi

[ "$PART" = tests ] && exit 0
cp selfboottok/ops/attention_table.json "$RES/attention_table.json"
step 100 $PY bench/attention.py --device cuda --repeats 10 --max-cell-seconds 3 --out "$RES" \
  --write-table "$RES/attention_table.json" > "$RES/attention_bench.log" 2>&1
tail -30 "$RES/attention_bench.log"
step 40 $PY bench/sinkhorn.py --device cuda --out "$RES" > "$RES/sinkhorn_bench.log" 2>&1
tail -20 "$RES/sinkhorn_bench.log"
step 80 $PY bench/throughput.py --device cuda --out "$RES" > "$RES/throughput.log" 2>&1
tail -12 "$RES/throughput.log"
