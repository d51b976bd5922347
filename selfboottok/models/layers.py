"""Building blocks shared by every model: transformer blocks over `selfboottok.ops.attention`,
patch embedding, learned 1D queries and 2D positional embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfboottok.ops import MultiheadAttention

__all__ = ["MultiheadAttention", "Block", "ResBlock", "ConvHead", "local_norm", "Transformer", "KVCache", "PatchEmbed", "LearnedQueries", "RegionCells",
           "sincos_2d", "unpatchify", "init_weights"]


class Mlp(nn.Sequential):
    def __init__(self, dim, ratio=4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context (a
    tensor or a list of chunks, read without concatenation), MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads)
        self.cross = None
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.norm_ctx = nn.LayerNorm(dim)
            self.cross = MultiheadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x, context=None, causal=False, key_padding_mask=None, cache=None):
        """`cache`: this block's slot of a :class:`KVCache` (decoding new positions only)."""
        h = self.norm1(x)
        x = x + self.attn(h, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        if self.cross is not None:
            chunks = context if isinstance(context, (list, tuple)) else [context]
            x = x + self.cross(self.norm_x(x), [self.norm_ctx(c) for c in chunks])
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """`depth` blocks and a final norm."""

    def __init__(self, dim, depth, heads, mlp_ratio=4.0, cross=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, context=None, causal=False, cache=None):
        """With a :class:`KVCache`, `x` holds only the positions after those cached, which
        then join the cache (causal decoding one or a few positions at a time)."""
        for i, block in enumerate(self.blocks):
            x = block(x, context, causal, cache=None if cache is None else cache[i])
        return self.norm(x)


class KVCache:
    """Keys and values of the positions decoded so far, one slot per block, for up to `length`
    positions: ``Transformer(x_new, causal=True, cache=cache)`` attends from the new positions
    to every cached one and to themselves, through the same blocks as the full forward."""

    def __init__(self, length: int):
        self.length = int(length)
        self.slots: dict[int, _Slot] = {}

    def __getitem__(self, layer: int) -> "_Slot":
        return self.slots.setdefault(layer, _Slot(self.length))


class _Slot:
    """One block's keys and values, preallocated on the first append to the full length in the
    dtype the projections give (bf16 under autocast)."""

    def __init__(self, length):
        self.length, self.size, self.k, self.v = length, 0, None, None

    def append(self, k, v):
        k, v = torch.cat(k, 2), torch.cat(v, 2)  # [B, H, n, D] from the chunks
        lo, hi = self.size, self.size + k.shape[2]
        if hi > self.length:
            raise ValueError(f"KVCache holds {self.length} positions, {hi} requested")
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.length, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, lo:hi] = k
        self.v[:, :, lo:hi] = v
        self.size = hi
        return [self.k[:, :, :hi]], [self.v[:, :, :hi]]


class PatchEmbed(nn.Module):
    """[B,3,H,W] -> [B, (H/p)(W/p), dim], row-major over the patch grid. `stem` > 0 first runs
    a 3x3 conv to `stem` channels and one residual conv block at full resolution, so each patch
    embedding sees its neighbours' pixels (edges, textures across the border)."""

    def __init__(self, patch, dim, channels=3, stem=0):
        super().__init__()
        self.patch = patch
        self.stem = None
        if stem:
            self.stem = nn.Sequential(nn.Conv2d(channels, stem, 3, padding=1), ResBlock(stem))
            channels = stem
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        if self.stem is not None:
            x = self.stem(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with group norm and SiLU, added to the input."""

    def __init__(self, channels):
        super().__init__()
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        self.body = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(groups, channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class ConvHead(nn.Module):
    """Patch tokens [B, N, W] (row-major grid) -> image [B, C, H, W]: a linear map to `hidden`
    features per pixel of each patch, laid out as a feature map (depth-to-space), `blocks`
    residual conv blocks and a 3x3 conv to the image: pixels on either side of a patch border
    are computed together, so the output has no patch seams. `skip_dim` > 0: per-patch vectors
    [B, N, skip_dim] passed to `forward` are mapped the same way and added to the feature map,
    a direct path from per-patch codes to the pixels."""

    def __init__(self, width, patch, grid, channels=3, hidden=32, blocks=1, skip_dim=0):
        super().__init__()
        self.patch, self.grid, self.hidden = patch, grid, hidden
        self.proj = nn.Linear(width, patch * patch * hidden)
        self.skip = nn.Linear(skip_dim, patch * patch * hidden) if skip_dim else None
        self.blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(blocks)))
        groups = max(g for g in (8, 4, 2, 1) if hidden % g == 0)
        self.out = nn.Sequential(nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x, skip=None):
        h = self.proj(x)
        if self.skip is not None:
            h = h + self.skip(skip)
        fmap = unpatchify(h, self.patch, self.grid, self.hidden)
        return self.out(self.blocks(fmap))


def unpatchify(x, patch, grid, channels=3):
    """[B, N, p*p*C] patch pixels (row-major grid) -> [B, C, H, W]."""
    B = x.shape[0]
    x = x.view(B, grid, grid, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * patch, grid * patch)


class LearnedQueries(nn.Module):
    """`n` learned query tokens, broadcast over the batch."""

    def __init__(self, n, dim):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n, dim) * dim**-0.5)

    def forward(self, batch):
        return self.tokens.expand(batch, -1, -1)


def sincos_2d(grid, dim):
    """Fixed 2D sin-cos positional embedding [grid*grid, dim] (dim divisible by 4)."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for 2D sin-cos embeddings, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64)
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ang = pos[:, None] * freq[None]  # [grid, dim/4]
    emb1 = torch.cat([ang.sin(), ang.cos()], 1)  # [grid, dim/2]
    yy = emb1[:, None, :].expand(grid, grid, -1)
    xx = emb1[None, :, :].expand(grid, grid, -1)
    return torch.cat([yy, xx], -1).reshape(grid * grid, dim).float()


def _region_side(grid, n):
    s = round(n**0.5)
    return s if s * s == n and grid % s == 0 else 0


def region_pool(x, grid, n):
    """Patch tokens [B, grid*grid, W] -> [B, n, W], the mean of each of n regions: an s x s grid
    of squares when n = s^2 and s divides grid, else contiguous runs of the raster order."""
    s = _region_side(grid, n)
    if s:
        g = x.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
        return F.adaptive_avg_pool2d(g, s).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def region_index(grid, n):
    """For each patch (raster order), the region of `region_pool` it falls in: LongTensor [grid^2]."""
    s = _region_side(grid, n)
    i = torch.arange(grid * grid, device="cpu")
    if s:
        r, c = i // grid, i % grid
        return (r * s // grid) * s + c * s // grid
    return i * n // (grid * grid)


class RegionCells(nn.Module):
    """What each grid cell of a decoder starts from: the code of the region it falls in, either
    mapped once per region (`unpack=False`: every cell of a region gets the same vector) or by
    one map per position inside the region (`unpack=True`), so a code can say something
    different about each of its patches."""

    def __init__(self, grid, n_regions, code_dim, width, unpack):
        super().__init__()
        region = region_index(grid, n_regions).tolist()  # plain numbers, also under a meta device
        seen = [0] * n_regions
        slot = []  # position of each patch inside its region
        for r in region:
            slot.append(seen[r])
            seen[r] += 1
        self.register_buffer("region", torch.tensor(region), persistent=False)
        self.register_buffer("slot", torch.tensor(slot), persistent=False)
        self.slots, self.width = max(seen), width
        self.unpack = nn.Linear(code_dim, width * self.slots) if unpack else None

    def forward(self, codes, codes_w):
        """codes [B, Q, c_g] and their shared map codes_w [B, Q, W] -> [B, N, W]."""
        if self.unpack is None:
            return codes_w[:, self.region]
        per_slot = self.unpack(codes).unflatten(-1, (self.slots, self.width))
        return per_slot[:, self.region, self.slot]


def local_norm(x, kind: str):
    """The fixed scale of local tokens (encoder outputs and the bootstrap decoder's predictions
    alike): "layer" (zero mean, unit variance per token), "rms" (unit root-mean-square per
    token, the mean kept) or "none"."""
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    if kind == "rms":
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
    return x


def init_weights(module):
    """Truncated-normal linear/embedding weights, zero biases, unit norms (ViT practice)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
