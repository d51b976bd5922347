"""Reconstruction metrics on images in [-1,1], codebook statistics and the Inception Score."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "gaussian_blur", "seam_ratio", "codebook_stats", "inception_score"]


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1,1] (peak-to-peak 2)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def gaussian_blur(x: torch.Tensor, size: int, sigma: float, same: bool = False) -> torch.Tensor:
    """Each channel of [B,C,H,W] `x` blurred by a normalised `size`-tap Gaussian of std `sigma`
    (separable, in x's dtype): over 'valid' windows only (H and W shrink by size - 1), or with
    `same`, over the image padded by replicating its border (same size out)."""
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    C = x.shape[1]
    if same:
        x = F.pad(x, ((size - 1) // 2, size // 2, (size - 1) // 2, size // 2), mode="replicate")
    return F.conv2d(F.conv2d(x, g.view(1, 1, size, 1).repeat(C, 1, 1, 1), groups=C),
                    g.view(1, 1, 1, size).repeat(C, 1, 1, 1), groups=C)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, dtype=None) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) for [B,C,H,W] images in [-1,1], computed on [0,1].

    Gaussian window `window`x`window` with std `sigma`, constants (k1*L)^2 and (k2*L)^2 with
    L=1, statistics over 'valid' windows only (no padding); the SSIM map is averaged over
    positions and then over channels. Images smaller than the window use the largest odd
    window that fits. Computed in `dtype` (default float64, float32 on MPS); differentiable,
    so ``1 - ssim`` serves as a training loss (in float32 there)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"pred and target must be [B,C,H,W], got {tuple(pred.shape)}")
    if dtype is None:
        dtype = torch.float32 if pred.device.type == "mps" else torch.float64
    x = (pred.to(dtype).clamp(-1, 1) + 1) / 2
    y = (target.to(dtype).clamp(-1, 1) + 1) / 2
    H, W = x.shape[-2:]
    size = min(window, H, W)
    size -= 1 - size % 2  # keep it odd

    def blur(t):
        return gaussian_blur(t, size, sigma)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = k1**2, k2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(1).float()


def seam_ratio(images: torch.Tensor, patch: int) -> float:
    """Patch seams: the mean absolute difference between neighbouring pixels across patch
    borders, divided by the same inside patches (horizontal and vertical neighbours, all
    channels). Natural images give about 1; a decoder that renders each patch on its own
    gives more."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
    if int(patch) < 2 or images.shape[-1] % patch or images.shape[-2] % patch:
        raise ValueError(f"patch must be >= 2 and divide the image size, got {patch} for "
                         f"{tuple(images.shape[-2:])}")
    x = images.double()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    across_x = torch.arange(1, x.shape[-1], device=x.device) % patch == 0
    across_y = torch.arange(1, x.shape[-2], device=x.device) % patch == 0
    border = torch.cat([dx[..., across_x].flatten(), dy[..., across_y, :].flatten()]).mean()
    inside = torch.cat([dx[..., ~across_x].flatten(), dy[..., ~across_y, :].flatten()]).mean()
    return float(border / inside.clamp_min(1e-12))


def codebook_stats(ids, vocab: int) -> dict:
    """Usage (fraction of the `vocab` codes that occur at least once in `ids`) and perplexity
    (exp of the entropy of the empirical code distribution; equals vocab for uniform use)."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integer code ids, got {ids.dtype}")
    if int(vocab) < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    ids = ids.reshape(-1).long().cpu()
    if ids.numel() == 0:
        raise ValueError("ids is empty")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"ids must be in [0, {vocab}), got [{ids.min().item()}, {ids.max().item()}]")
    counts = torch.bincount(ids, minlength=int(vocab)).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = -(nz * nz.log()).sum().item()
    return {"usage": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy)}


def inception_score(logits_or_probs, splits: int = 10, probs: bool | None = None):
    """Inception Score (Salimans et al. 2016) of [N, classes] classifier outputs: the mean and
    standard deviation over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))).

    `probs=None` treats the input as probabilities when every row is non-negative and sums to
    1, and as logits (softmaxed here) otherwise. Computed in float64."""
    a = logits_or_probs
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"logits_or_probs must be [N, classes] with classes >= 2, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("logits_or_probs contains NaN or Inf")
    splits = int(splits)
    if not 1 <= splits <= a.shape[0]:
        raise ValueError(f"splits must be in [1, N={a.shape[0]}], got {splits}")
    if probs is None:
        probs = bool((a >= 0).all() and np.allclose(a.sum(1), 1.0, atol=1e-4))
    if probs:
        p = a / a.sum(1, keepdims=True)
    else:
        z = a - a.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
