"""The bootstrap (local) decoder: global codes only -> predicted 1D and 2D local tokens."""

from __future__ import annotations

import torch
from torch import nn

from .layers import LearnedQueries, Transformer, init_weights, local_norm, RegionCells, sincos_2d

__all__ = ["BootstrapDecoder"]


class BootstrapDecoder(nn.Module):
    """K_l 1D queries and N grid queries cross-attend to the global codes (the fused attention
    kernel's local-decoder pattern) and regress the encoder's local tokens."""

    def __init__(self, config):
        super().__init__()
        vit = config.bootstrap
        self.num_local = config.num_local
        self.norm = config.local_norm if config.bootstrap_norm else "none"
        self.code_in = nn.Linear(config.code_dim, vit.width)
        self.code_pos = nn.Parameter(torch.zeros(config.num_global, vit.width))
        self.queries_1d = LearnedQueries(config.num_local, vit.width)
        self.grid_token = nn.Parameter(torch.zeros(1, 1, vit.width))
        self.register_buffer("pos", sincos_2d(config.grid, vit.width), persistent=False)
        self.vit = Transformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio, cross=True)
        self.out_1d = nn.Linear(vit.width, config.local_dim)
        self.out_2d = nn.Linear(vit.width, config.local_2d_dim)
        self.cells = None  # as in the pixel decoder
        if config.num_pooled:
            self.cells = RegionCells(config.grid, config.num_pooled, config.code_dim, vit.width,
                                     config.unpack_codes)
        init_weights(self)

    def forward(self, codes):
        """codes [B, K_g, c_g] -> (local_1d [B, K_l, c_l], local_2d [B, N, c_2])."""
        B = codes.shape[0]
        grid = self.grid_token.expand(B, self.pos.shape[0], -1) + self.pos
        codes_w = self.code_in(codes)
        if self.cells is not None:
            grid = grid + self.cells(codes, codes_w)
        x = torch.cat([self.queries_1d(B), grid], 1)
        h = self.vit(x, codes_w + self.code_pos)
        local_1d = self.out_1d(h[:, : self.num_local])
        local_2d = self.out_2d(h[:, self.num_local :])
        # the same fixed scale as the encoder's local tokens
        return local_norm(local_1d, self.norm), local_norm(local_2d, self.norm)
