"""Builds selfboottok with its C++/CUDA extension selfboottok._C.

Install with `pip install --no-build-isolation .` (or `-e .`) so the build sees the installed
torch. SELFBOOTTOK_CUDA=0/1 forces the CUDA sources off/on; TORCH_CUDA_ARCH_LIST is respected
(default 8.0;9.0 without a GPU); MAX_JOBS defaults to what memory allows (~3 GB per nvcc job).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    spec = importlib.util.spec_from_file_location("_sbt_build", ROOT / "selfboottok/ops/_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    build = _load_build_config()
    cuda, reason = build.want_cuda()
    print(f"selfboottok: CUDA kernels {'on' if cuda else 'off'} ({reason})")
    build.prepare_environment(cuda)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    kwargs = build.extension_kwargs(cuda)
    kwargs["sources"] = [os.path.relpath(s, ROOT) for s in kwargs["sources"]]
    ext = (CUDAExtension if cuda else CppExtension)("selfboottok._C", **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    packages=find_packages(include=["selfboottok", "selfboottok.*"]) + ["selfboottok._csrc"],
    package_dir={"selfboottok._csrc": "csrc"},
    package_data={"selfboottok.ops": ["attention_table.json"], "selfboottok.eval": ["weights/*"],
                  "selfboottok._csrc": ["sources.txt", "*.cpp", "*.h", "*/*.h", "*/*.inc", "*/*.cuh", "*/*.cpp",
                                        "*/*.cu"]},
)
