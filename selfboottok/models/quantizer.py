"""Quantizers for the global latents: VQ with l2-normalised codes (straight-through, commitment
loss, dead-code restarts) and FSQ. Both report codebook usage and perplexity."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizerOutput", "VectorQuantizer", "FSQuantizer", "build_quantizer"]


class QuantizerOutput(NamedTuple):
    codes: torch.Tensor  # [B, K, c] quantized latents (straight-through gradient)
    ids: torch.Tensor  # [B, K] int64
    loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar, exp(entropy) of the batch's code histogram
    usage: torch.Tensor  # scalar, fraction of codes hit in this batch


def _stats(ids, vocab):
    flat = ids.flatten()
    counts = torch.zeros(vocab, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return torch.exp(entropy), (counts > 0).float().mean(), counts


class VectorQuantizer(nn.Module):
    """Nearest code by cosine similarity; latents and codes are l2-normalised (TiTok/ViT-VQGAN).
    The first training forward sets the codebook to latents of its batch; afterwards a code not
    hit for `dead_steps` training forwards is restarted at a random latent of the current batch."""

    def __init__(self, vocab, dim, commitment=0.25, dead_steps=100):
        super().__init__()
        self.vocab, self.dim, self.commitment, self.dead_steps = vocab, dim, commitment, dead_steps
        self.embedding = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embedding.weight)
        self.register_buffer("idle", torch.zeros(vocab, dtype=torch.long), persistent=True)
        self.register_buffer("initialized", torch.tensor(False), persistent=True)

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z):
        z = F.normalize(z.float(), dim=-1)
        # codebook upkeep first, so the graph below sees the codes it will use
        if self.training and torch.is_grad_enabled() and self.dead_steps > 0 and z.device.type != "meta":
            with torch.no_grad():
                hits = _stats((z @ self.codebook().T).argmax(-1), self.vocab)[2]
            self._restart_dead(z.detach(), hits)
        book = self.codebook()
        ids = (z @ book.T).argmax(-1)
        e = book[ids]
        loss = self.commitment * (z - e.detach()).pow(2).mean() + (z.detach() - e).pow(2).mean()
        perplexity, usage, _ = _stats(ids, self.vocab)
        codes = z + (e - z).detach()
        return QuantizerOutput(codes, ids, loss, perplexity, usage)

    @torch.no_grad()
    def _restart_dead(self, z, counts):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.idle.add_(1).masked_fill_(counts > 0, 0)
        if not self.initialized:
            dead = torch.arange(self.vocab, device=z.device)
            self.initialized.fill_(True)
        else:
            dead = (self.idle >= self.dead_steps).nonzero().flatten()
        if dead.numel() == 0:
            return
        flat = z.reshape(-1, self.dim)
        pick = torch.randint(flat.shape[0], (dead.numel(),), device=z.device)
        # a little noise keeps codes drawn from the same latent apart
        fresh = flat[pick] + 0.01 * torch.randn(dead.numel(), self.dim, device=z.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(fresh, 0)  # every rank restarts to the same codes
        self.embedding.weight[dead] = fresh.to(self.embedding.weight.dtype)
        self.idle[dead] = 0

    def lookup(self, ids):
        return self.codebook()[ids]


class FSQuantizer(nn.Module):
    """Finite scalar quantization: each of len(levels) channels is bounded by tanh and rounded
    to `levels[i]` values; ids are the mixed-radix index. No codebook, no auxiliary loss."""

    def __init__(self, levels):
        super().__init__()
        self.levels = tuple(int(x) for x in levels)
        self.vocab = 1
        for level in self.levels:
            self.vocab *= level
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def forward(self, z):
        half = (self._levels - 1) / 2
        # offset keeps an even number of levels symmetric around the rounding grid
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(z.float()) * half - offset
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        digits = (torch.round(bounded) + offset + half).long()
        ids = (digits * self._basis).sum(-1)
        codes = (rounded + offset) / half
        perplexity, usage, _ = _stats(ids, self.vocab)
        return QuantizerOutput(codes, ids, codes.new_zeros(()), perplexity, usage)

    def lookup(self, ids):
        digits = (ids[..., None] // self._basis) % self._levels.long()
        half = (self._levels - 1) / 2
        return (digits.float() - half) / half


def build_quantizer(config):
    if config.quantizer == "fsq":
        return FSQuantizer(config.fsq_levels)
    return VectorQuantizer(config.codebook_size, config.global_dim, config.commitment,
                           config.dead_code_steps)
