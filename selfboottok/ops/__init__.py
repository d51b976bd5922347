"""Standalone kernels: importable without the models (``import selfboottok.ops``).

Each op has one public function, a pure-PyTorch reference in ``_torch_impl`` and backends chosen
by ``backend="auto"``: Sinkhorn ``cuda`` / ``triton`` / ``cpu`` / ``torch``; attention ``sdpa``
(PyTorch's fused kernels) / ``cuda`` / ``triton`` / ``torch``.
"""

from ._backend import status as backend_status
from .attention import attention
from .multihead import MultiheadAttention
from .sinkhorn import SinkhornResult, sinkhorn

__all__ = ["attention", "MultiheadAttention", "sinkhorn", "SinkhornResult", "backend_status"]
