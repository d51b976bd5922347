"""SelfBootTok: a global/local image tokenizer whose local tokens are bootstrapped from the
global ones. `selfboottok.ops` holds the standalone kernels (Sinkhorn OT, fused attention)."""

__version__ = "0.1.0"

from .config import SelfBootTokConfig  # noqa: E402
from .pipeline import SelfBootTok, TokenizeResult  # noqa: E402

__all__ = ["SelfBootTok", "SelfBootTokConfig", "TokenizeResult", "__version__"]
