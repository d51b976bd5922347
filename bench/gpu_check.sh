#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no internet, its own torch): build the extension,
# run the GPU tests, run the GPU benchmarks. Each step has its own time limit so the run ends
# with whatever it got. Results and logs go to $RES (default bench/results); when $OUT is set
# (the device tool's output folder) they are also packed into $OUT/gpu_results.tar.gz.
# Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-bench/results}
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SELFBOOTTOK_CUDA=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tar.gz" "$RES"; }
trap pack EXIT
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?; echo "== rc=$rc in $((SECONDS - t0))s"; return $rc; }

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, torch.version.cuda, 'triton', triton.__version__)"; } | tee "$RES/machine.txt"
step 280 $PY -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1 \
  || { echo "build failed; see build.log"; tail -40 "$RES/build.log"; exit 1; }
tail -3 "$RES/build.log"
$PY -m selfboottok.ops | tee "$RES/backends.txt"
tests="tests/test_attention_cuda.py tests/test_attention_triton.py tests/test_sinkhorn_gpu.py tests/test_sinkhorn_triton.py tests/test_attention.py"
# -v names each test as it ends, so a run cut off by its limit still says which ones failed
step 300 $PY -m pytest -v -n 12 -p no:cacheprovider -p no:benchmark --timeout 90 -rfE $tests > "$RES/gpu_tests.log" 2>&1
grep -E "FAILED|ERROR|passed|failed|node down" "$RES/gpu_tests.log" | tail -40
step 80 $PY bench/attention.py --device cuda --repeats 10 --max-cell-seconds 3 --out "$RES" > "$RES/attention_bench.log" 2>&1
tail -30 "$RES/attention_bench.log"
step 40 $PY bench/sinkhorn.py --device cuda --out "$RES" > "$RES/sinkhorn_bench.log" 2>&1
tail -20 "$RES/sinkhorn_bench.log"
step 80 $PY bench/throughput.py --device cuda --out "$RES" > "$RES/throughput.log" 2>&1
tail -12 "$RES/throughput.log"
