"""The global/local tokenizer: ViT encoder with global and 1D local queries, the quantizer of the
global latents, OT-aligned 1D local tokens, 2D local tokens, and the pixel decoder."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .alignment import Alignment
from .layers import (ConvHead, LearnedQueries, PatchEmbed, Transformer, init_weights, local_norm,
                     RegionCells, region_pool, sincos_2d, unpatchify)
from .quantizer import build_quantizer

__all__ = ["Encoded", "Encoder", "PixelDecoder", "Tokenizer"]


class Encoded(NamedTuple):
    codes: torch.Tensor  # [B, Q, c_g] quantized (straight-through), Q = config.num_quantized
    ids: torch.Tensor  # [B, Q]
    local_1d: Optional[torch.Tensor]  # [B, K_l, c_l]; None in baseline mode
    local_2d: Optional[torch.Tensor]  # [B, N, c_2]; None in baseline mode
    quant_loss: torch.Tensor
    align_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    slot_mass: Optional[torch.Tensor]  # [B, K_l]


class Encoder(nn.Module):
    """Patches (+ fixed 2D positions) and `n_queries` learned 1D queries through one ViT:
    returns (patch features [B,N,W], query outputs [B,n_queries,W])."""

    def __init__(self, config, n_queries):
        super().__init__()
        vit = config.encoder
        self.patch = PatchEmbed(config.patch_size, vit.width, config.channels, config.encoder_stem)
        self.register_buffer("pos", sincos_2d(config.grid, vit.width), persistent=False)
        self.queries = LearnedQueries(n_queries, vit.width)
        self.query_pos = nn.Parameter(torch.zeros(n_queries, vit.width))
        self.vit = Transformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio)
        self.n_patches, self.grid = config.num_patches, config.grid
        self.n_pooled = config.num_pooled

    def forward(self, images):
        content = self.patch(images)
        x = content + self.pos.to(images.dtype)
        q = (self.queries(x.shape[0]) + self.query_pos).to(x.dtype)
        if self.n_pooled:
            # each quantized query starts from one region's content, so its token carries layout
            # from the first step instead of after attention has learned to single regions out
            pooled = region_pool(content, self.grid, self.n_pooled)
            q = torch.cat([q[:, : self.n_pooled] + pooled, q[:, self.n_pooled :]], 1)
        h = self.vit(torch.cat([x, q], 1))
        return h[:, : self.n_patches], h[:, self.n_patches :]


class PixelDecoder(nn.Module):
    """Grid queries (learned token + 2D positions + the 2D local tokens) self-attend and
    cross-attend to the context chunks [global codes, 1D local tokens], read without copy."""

    def __init__(self, config):
        super().__init__()
        vit = config.decoder
        self.config = config
        self.grid_token = nn.Parameter(torch.zeros(1, 1, vit.width))
        self.register_buffer("pos", sincos_2d(config.grid, vit.width), persistent=False)
        self.code_in = nn.Linear(config.code_dim, vit.width)
        self.code_pos = nn.Parameter(torch.zeros(config.num_quantized, vit.width))
        self.global_mode = config.generator_tokens == "global"
        if self.global_mode:
            self.local_in = nn.Linear(config.local_dim, vit.width)
            self.local_pos = nn.Parameter(torch.zeros(config.num_local, vit.width))
            self.local_2d_in = nn.Linear(config.local_2d_dim, vit.width)
        self.vit = Transformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio, cross=True)
        if config.decoder_head == "conv":
            skip = config.local_2d_dim if self.global_mode and config.head_local_2d else 0
            self.out = ConvHead(vit.width, config.patch_size, config.grid, config.channels,
                                config.head_channels, config.head_blocks, skip)
        else:
            self.out = nn.Linear(vit.width, config.patch_size**2 * config.channels)
        self.cells = None  # grid cell p starts from the code of its region
        if config.num_pooled:
            self.cells = RegionCells(config.grid, config.num_pooled, config.code_dim, vit.width,
                                     config.unpack_codes)

    def last_layer(self) -> torch.Tensor:
        """The weight of the layer that outputs pixels (for the adaptive GAN weight)."""
        return self.out.out[-1].weight if isinstance(self.out, ConvHead) else self.out.weight

    def forward(self, codes, local_1d=None, local_2d=None):
        B = codes.shape[0]
        x = self.grid_token.expand(B, self.config.num_patches, -1) + self.pos
        codes_w = self.code_in(codes)
        if self.cells is not None:
            x = x + self.cells(codes, codes_w)
        context = [codes_w + self.code_pos]
        if self.global_mode:
            x = x + self.local_2d_in(local_2d)
            context.append(self.local_in(local_1d) + self.local_pos)
        h = self.vit(x, context)
        c = self.config
        if c.decoder_head == "conv":
            return self.out(h, local_2d)
        return unpatchify(self.out(h), c.patch_size, c.grid, c.channels)


class Tokenizer(nn.Module):
    """Stage-1 tokenizer. In SelfBootTok mode: K_g quantized global tokens, K_l continuous 1D
    local tokens (OT-aligned projections of the patch features), and per-patch 2D local tokens.
    In baseline mode (`generator_tokens="all"`): K_g + K_l quantized tokens, TiTok-style."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.global_mode = config.generator_tokens == "global"
        width = config.encoder.width
        n_queries = config.num_global + config.num_local
        self.encoder = Encoder(config, n_queries)
        self.to_code = nn.Linear(width, config.code_dim)
        self.quantizer = build_quantizer(config)
        if self.global_mode:
            self.to_slot = nn.Linear(width, config.local_dim)
            self.to_feat = nn.Linear(width, config.local_dim)
            self.to_2d = nn.Linear(width, config.local_2d_dim)
            self.pixels_2d = None
            if config.local_2d_pixels:
                self.pixels_2d = nn.Conv2d(config.channels, config.local_2d_dim, config.patch_size,
                                           stride=config.patch_size)
            self.alignment = Alignment(config.alignment, config.ot_eps, config.ot_iters,
                                       config.softmax_tau)
        self.decoder = PixelDecoder(config)
        init_weights(self)

    def encode(self, images) -> Encoded:
        feats, queries = self.encoder(images)
        K_g = self.config.num_global
        latents = queries if not self.global_mode else queries[:, :K_g]
        q = self.quantizer(self.to_code(latents))
        zero = q.loss.new_zeros(())
        if not self.global_mode:
            return Encoded(q.codes, q.ids, None, None, q.loss, zero, q.perplexity, q.usage, None)
        aligned = self.alignment(self.to_feat(feats), self.to_slot(queries[:, K_g:]))
        # fixed-scale local tokens, so the bootstrap loss cannot shrink by rescaling them
        local_1d = local_norm(aligned.tokens, self.config.local_norm)
        local_2d = self.to_2d(feats)
        if self.pixels_2d is not None:
            local_2d = local_2d + self.pixels_2d(images).flatten(2).transpose(1, 2)
        local_2d = local_norm(local_2d, self.config.local_norm)
        return Encoded(q.codes, q.ids, local_1d, local_2d, q.loss, aligned.loss, q.perplexity,
                       q.usage, aligned.slot_mass)

    def codes(self, ids):
        return self.quantizer.lookup(ids)
