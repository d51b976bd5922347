"""SelfBootTok: a global/local image tokenizer whose local tokens are bootstrapped from the
global ones. `selfboottok.ops` holds the standalone kernels (Sinkhorn OT, fused attention)."""

__version__ = "0.1.0"
