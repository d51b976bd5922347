"""Finds the compiled kernels and says which backends can run, and why the others cannot."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("selfboottok.ops")

BACKENDS = ("cuda", "triton", "cpu", "torch")


_loaded: list = []  # a plain cache (not lru_cache) so torch.compile traces the lookup


def extension():
    """(module or None, reason). Imports selfboottok._C, else JIT-builds it into a cache dir."""
    if not _loaded:
        _loaded.append(_load())
    return _loaded[0]


def _load():
    try:
        from selfboottok import _C  # noqa: F401

        return _C, "compiled extension selfboottok._C"
    except ImportError as exc:
        import_error = exc
    if os.environ.get("SELFBOOTTOK_NO_JIT") == "1":
        reason = f"selfboottok._C not importable ({import_error}) and SELFBOOTTOK_NO_JIT=1"
        log.warning("selfboottok: %s; using the next backend", reason)
        return None, reason
    try:
        return _jit_build(), "JIT-built extension"
    except Exception as exc:  # any build failure means: fall back, say why once
        reason = f"selfboottok._C is not installed and the JIT build failed: {exc}"
        log.warning("selfboottok: %s; using the next backend", str(reason).splitlines()[0])
        return None, reason


def _jit_build():
    from . import _build

    cuda = torch.cuda.is_available() and _build.want_cuda()[0]
    _build.prepare_environment(cuda)
    from torch.utils.cpp_extension import load

    kwargs = _build.extension_kwargs(cuda)
    tag = f"torch{torch.__version__.split('+')[0]}_{'cuda' if cuda else 'cpu'}"
    cache = Path(
        os.environ.get("SELFBOOTTOK_CACHE", Path.home() / ".cache" / "selfboottok")
    ) / tag
    cache.mkdir(parents=True, exist_ok=True)
    log.warning("selfboottok: building the extension into %s (first use only)", cache)
    cflags = kwargs["extra_compile_args"]
    return load(
        name="selfboottok_C",
        sources=kwargs["sources"],
        extra_include_paths=kwargs["include_dirs"],
        extra_cflags=cflags["cxx"],
        extra_cuda_cflags=cflags.get("nvcc"),
        extra_ldflags=kwargs["extra_link_args"],
        build_directory=str(cache),
        with_cuda=cuda,
        verbose=False,
    )


def _triton_status(device_type: str) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if interpret:
            return False, "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
        return True, "triton on the GPU"
    if interpret:
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    return False, "triton needs a GPU tensor (or TRITON_INTERPRET=1 for CPU tensors)"


def status(device_type: str = "cpu") -> dict[str, tuple[bool, str]]:
    """backend -> (available for tensors on `device_type`, reason)."""
    ext, why = extension()
    out = {}
    if device_type == "cuda":
        if ext is None:
            out["cuda"] = (False, why)
        elif not ext.cuda_compiled():
            out["cuda"] = (False, "selfboottok._C was built without CUDA sources")
        elif not torch.cuda.is_available():
            out["cuda"] = (False, "no CUDA device")
        else:
            out["cuda"] = (True, "CUDA kernels in selfboottok._C")
    else:
        out["cuda"] = (False, "tensors are not on a CUDA device")
    out["triton"] = _triton_status(device_type)
    if device_type == "cpu":
        out["cpu"] = (True, f"C++ kernels ({why})") if ext is not None else (False, why)
    else:
        out["cpu"] = (False, "tensors are not on the CPU")
    out["torch"] = (True, "pure-PyTorch reference")
    return out


def resolve(backend: str, device: torch.device, auto_order: tuple[str, ...], avail=None) -> str:
    """The backend to run: `auto` picks the first available in auto_order. `avail` is an op's
    own status dict (its keys are the op's backends) when it differs from `status`."""
    avail = status(device.type) if avail is None else avail
    if backend not in tuple(avail) + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + tuple(avail)}, got {backend!r}")
    if backend == "auto":
        for name in auto_order:
            # the Triton interpreter on CPU tensors is for tests; auto never picks it
            if name == "triton" and device.type == "cpu":
                continue
            if avail[name][0]:
                return name
        return "torch"
    ok, reason = avail[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available for {device.type} tensors: {reason}")
    return backend
