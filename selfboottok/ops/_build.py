"""How the selfboottok._C extension is built; shared by setup.py and the JIT loader.

setup.py loads this file by path, so it imports nothing from the package and imports torch
only inside functions, after the environment (CUDA_HOME, arch list, job count) is prepared.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sysconfig
from pathlib import Path

DEFAULT_ARCH_LIST = "8.0;9.0"
GB_PER_NVCC_JOB = 3


def csrc_dir() -> Path:
    """The extension sources: the repository's csrc/, or the copy shipped in the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "_csrc"):
        if (candidate / "sources.txt").is_file():
            return candidate
    raise FileNotFoundError("selfboottok: extension sources (csrc/sources.txt) not found")


def sources(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) listed in csrc/sources.txt, as absolute paths."""
    root = root or csrc_dir()
    names = [
        line.strip()
        for line in (root / "sources.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    paths = [str(root / n) for n in names]
    return [p for p in paths if not p.endswith(".cu")], [p for p in paths if p.endswith(".cu")]


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, resolving an `nvcc` on PATH that is a wrapper script."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if (real.parent.parent / "include" / "cuda_runtime.h").is_file():
            return str(real.parent.parent)
        try:
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for target in re.findall(r"(/\S+)/bin/nvcc", text):
            if (Path(target) / "include" / "cuda_runtime.h").is_file():
                return target
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if (Path(root) / "bin" / "nvcc").is_file():
            return root
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Header folders of the CUDA pip wheels (nvidia/cu13/include holds cusparse.h & co)."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = []
    for pattern in ("nvidia/cu13/include", "nvidia/cu12/include"):
        p = site / pattern
        if p.is_dir():
            found.append(str(p))
    return found


def max_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS if set, else what CPU count and memory allow."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        avail_gb = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        avail_gb = GB_PER_NVCC_JOB
    return max(1, min(cpus, int(avail_gb // GB_PER_NVCC_JOB)))


def want_cuda() -> tuple[bool, str]:
    """Whether to compile the CUDA sources, and why. SELFBOOTTOK_CUDA=0/1 forces the choice."""
    import torch

    forced = os.environ.get("SELFBOOTTOK_CUDA")
    if forced is not None and forced.strip() not in ("0", "1"):
        raise ValueError(f"SELFBOOTTOK_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "SELFBOOTTOK_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            raise RuntimeError("SELFBOOTTOK_CUDA=1 but the installed torch has no CUDA")
        return False, "the installed torch is a CPU build"
    if find_cuda_home() is None:
        if forced == "1":
            raise RuntimeError("SELFBOOTTOK_CUDA=1 but no CUDA toolkit (nvcc) was found")
        return False, "no CUDA toolkit (nvcc) found"
    if forced == "1":
        return True, "SELFBOOTTOK_CUDA=1"
    if not torch.cuda.is_available():  # minutes of nvcc for kernels nothing here can run
        return False, "no GPU is visible (SELFBOOTTOK_CUDA=1 compiles the CUDA kernels anyway)"
    return True, "torch has CUDA, nvcc is found and a GPU is visible"


def prepare_environment(cuda: bool) -> None:
    """Sets CUDA_HOME, TORCH_CUDA_ARCH_LIST and MAX_JOBS before torch.utils.cpp_extension loads."""
    os.environ.setdefault("MAX_JOBS", str(max_jobs()))
    if not cuda:
        return
    home = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def compile_args(cuda: bool) -> dict:
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-semantic-interposition"]
    args = {"cxx": cxx + (["-DSELFBOOTTOK_WITH_CUDA"] if cuda else [])}
    if cuda:
        args["nvcc"] = ["-O3", "-lineinfo", "-DSELFBOOTTOK_WITH_CUDA"]
    return args


def extension_kwargs(cuda: bool) -> dict:
    """Keyword arguments shared by CppExtension/CUDAExtension and cpp_extension.load."""
    cpp, cu = sources()
    return {
        "sources": cpp + (cu if cuda else []),
        "include_dirs": [str(csrc_dir())] + (pip_cuda_include_dirs() if cuda else []),
        "extra_compile_args": compile_args(cuda),
        "extra_link_args": ["-fopenmp"],
    }
