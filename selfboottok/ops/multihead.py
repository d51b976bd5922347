"""`MultiheadAttention`: q/k/v/out projections over :func:`selfboottok.ops.attention`."""

from __future__ import annotations

from torch import nn

from .attention import attention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with q/k/v/out projections over :func:`attention`.

    ``kv_dim`` is the feature size of ``context`` for cross-attention (default ``dim``).
    """

    def __init__(self, dim, num_heads, qkv_bias=True, kv_dim=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, key_padding_mask=None, causal=False, cache=None):
        """x ``[B,L,dim]``; context ``[B,Lk,kv_dim]`` or a list of such chunks (default x);
        key_padding_mask bool ``[B,Lk]``. `cache` (incremental decoding): an object whose
        ``append(k, v)`` stores this call's key and value chunks and returns all those stored so
        far, which are attended to instead. Returns ``[B,L,dim]``."""
        context = x if context is None else context
        chunks = list(context) if isinstance(context, (list, tuple)) else [context]
        q = self._heads(self.q_proj(x))
        k = [self._heads(self.k_proj(c)) for c in chunks]
        v = [self._heads(self.v_proj(c)) for c in chunks]
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
        B, _, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))

    def _heads(self, t):
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, -1).transpose(1, 2)
