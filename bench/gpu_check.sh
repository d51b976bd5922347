#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no internet, its own torch): build the extension,
# run the GPU tests, run the GPU benchmarks. Results and logs go to $OUT (the device tool's
# output folder) or bench/results/. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SELFBOOTTOK_CUDA=1
{ nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } | tee "$OUT/machine.txt"
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || python setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
  || { echo "build failed; see build.log"; tail -40 "$OUT/build.log"; exit 1; }
python -m selfboottok.ops | tee "$OUT/backends.txt"
python -m pytest -q -x tests/test_sinkhorn_gpu.py tests/test_sinkhorn_triton.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python bench/sinkhorn.py --device cuda --out "$OUT" 2>&1 | tail -20
attn_tests=$(ls tests/test_attention_cuda.py tests/test_attention_triton.py tests/test_attention.py 2>/dev/null)
[ -n "$attn_tests" ] && timeout 240 python -m pytest -q $attn_tests 2>&1 | tee "$OUT/attention_tests.log" | tail -15
timeout 180 python bench/attention.py --device cuda --out "$OUT" > "$OUT/attention_bench.log" 2>&1; tail -30 "$OUT/attention_bench.log"
