"""Standalone kernels: importable without the models (``import selfboottok.ops``).

Each op has one public function, a pure-PyTorch reference in ``_torch_impl`` and backends
``cuda`` / ``triton`` / ``cpu`` / ``torch`` chosen by ``backend="auto"``.
"""

from ._backend import status as backend_status
from .attention import MultiheadAttention, attention
from .sinkhorn import SinkhornResult, sinkhorn

__all__ = ["attention", "MultiheadAttention", "sinkhorn", "SinkhornResult", "backend_status"]
