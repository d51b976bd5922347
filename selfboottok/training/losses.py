"""The training losses of both stages, as functions of a SelfBootTok model: stage 1 (the
tokenizer), stage 2 (generators and bootstrap decoder on frozen global tokens) and the
generators' cross-entropy on token ids. Each returns a dict of terms with the weighted total
under "loss"."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfboottok.eval.metrics import gaussian_blur, ssim

__all__ = ["stage1_losses", "stage2_losses", "generator_losses", "reconstruction_loss",
           "focal_frequency_loss", "hog_features", "hog_loss", "PARTS"]

PARTS = ("generator", "bootstrap")


def stage1_losses(model, images, full_path: bool = True, adversary=None) -> dict:
    """Tokenizer losses: reconstruction from (global + true local) and from (global +
    bootstrapped local), bootstrap regression, quantizer and OT alignment. ``full_path=False``
    (SelfBootTok mode) leaves out the reconstruction from the true local tokens: the global
    warm-up of `train.global_warmup`. `adversary` (a `training.adversarial.Adversary`) adds
    its generator term for every reconstruction."""
    c = model.config
    images = model._check_images(images, values=False)
    enc = model.tokenizer.encode(images)
    out = {"quant": enc.quant_loss.float(), "perplexity": enc.perplexity.detach(),
           "usage": enc.usage.detach()}
    total = c.w_quant * out["quant"]
    gan = []
    if full_path or not model.global_mode:
        decoder = model.pixel_decoder(False)
        rec = decoder(enc.codes, enc.local_1d, enc.local_2d)
        out["rec"] = reconstruction_loss(rec, images, c.loss)
        out["mse"] = F.mse_loss(rec.detach().float(), images.float())
        total = total + c.w_rec * out["rec"]
        gan.append((rec, c.w_rec * out["rec"], 1.0, decoder))
    if model.global_mode:
        t1, t2 = _local_targets(model, images, enc)
        b1, b2 = model.bootstrap(enc.codes)
        decoder = model.pixel_decoder(True)
        rec_boot = decoder(enc.codes, b1, b2)
        out["rec_boot"] = reconstruction_loss(rec_boot, images, c.loss, global_path=True)
        out["mse_boot"] = F.mse_loss(rec_boot.detach().float(), images.float())
        out["boot"] = _boot_loss(b1, b2, t1, t2)
        out["align"] = enc.align_loss.float()
        total = (total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
                 + c.w_align * out["align"])
        gan.append((rec_boot, c.w_rec_boot * out["rec_boot"], c.loss.gan_global_scale, decoder))
    if adversary is not None:
        out["gan"] = _adversarial(images, gan, adversary)
        total = total + out["gan"]
    out["loss"] = total
    return out


def _adversarial(images, recs, adversary):
    """The adversary's generator terms of (reconstruction, its weighted loss, scale, the pixel
    decoder that drew it) tuples, each weighted at that decoder's last layer; a reconstruction
    of scale 0 is not shown to the discriminator either."""
    terms = [scale * adversary.generator_loss(images, rec, rec_loss, decoder.last_layer())
             for rec, rec_loss, scale, decoder in recs if scale]
    return sum(terms) if terms else images.new_zeros((), dtype=torch.float32)


def stage2_losses(model, images, labels, parts=PARTS, adversary=None) -> dict:
    """With the encoder and quantizer frozen: generator cross-entropy on the frozen ids (every
    generator in the config) and the decoder side: the bootstrap decoder and the pixel decoder on
    the bootstrap path (SelfBootTok mode) and the pixel decoder on the full path (with the true
    local tokens; `train.stage2_full_path`, so that reconstruction keeps working while the
    decoder adapts to bootstrapped tokens; always in baseline mode, its only path). `parts`
    selects either side for separate jobs; `adversary`, as in :func:`stage1_losses`, for the
    decoder side."""
    c = model.config
    images = model._check_images(images, values=False)
    labels = model._check_labels(labels, values=False)
    with torch.no_grad():
        enc = model.tokenizer.encode(images)
    out, total = {}, 0.0
    if "generator" in parts:
        out = generator_losses(model, enc.ids, labels)
        total = out.pop("loss")
    if "bootstrap" in parts:
        decoded = []
        if c.train.stage2_full_path or not model.global_mode:  # the baseline has only this path
            decoder = model.pixel_decoder(False)
            rec = decoder(enc.codes, enc.local_1d, enc.local_2d)
            out["rec"] = reconstruction_loss(rec, images, c.loss)
            total = total + c.w_rec * out["rec"]
            decoded.append((rec, c.w_rec * out["rec"], 1.0, decoder))
        if model.global_mode:
            b1, b2 = model.bootstrap(enc.codes)
            decoder = model.pixel_decoder(True)
            rec_boot = decoder(enc.codes, b1, b2)
            out["rec_boot"] = reconstruction_loss(rec_boot, images, c.loss, global_path=True)
            out["boot"] = _boot_loss(b1, b2, enc.local_1d, enc.local_2d)
            total = total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
            decoded.append((rec_boot, c.w_rec_boot * out["rec_boot"], c.loss.gan_global_scale, decoder))
        if adversary is not None:
            out["gan"] = _adversarial(images, decoded, adversary)
            total = total + out["gan"]
    out["loss"] = total if isinstance(total, torch.Tensor) else images.new_zeros(())
    return out


def generator_losses(model, ids, labels) -> dict:
    """Cross-entropy of every generator on the ids the generators model (`tokenize(x).ids`)."""
    ids = model._check_ids(ids, model.config.num_quantized, "ids", values=False)  # no host sync
    labels = model._check_labels(labels, values=False)
    out = {f"gen_{kind}": gen.loss(ids, labels) for kind, gen in model.generators.items()}
    out["loss"] = sum(out.values())
    return out


def reconstruction_loss(rec, images, loss_cfg, global_path: bool = False):
    """The weighted sum of the reconstruction terms of `loss_cfg` (a LossConfig) that have a
    weight, in float32; on a reconstruction of the `global_path` the HOG term is scaled by
    `loss_cfg.hog_global_scale`."""
    rec, images = rec.float(), images.float()
    total = rec.new_zeros(())
    if loss_cfg.l2:
        total = total + loss_cfg.l2 * F.mse_loss(rec, images)
    if loss_cfg.l1:
        total = total + loss_cfg.l1 * F.l1_loss(rec, images)
    if loss_cfg.ssim:
        total = total + loss_cfg.ssim * (1 - ssim(rec, images, dtype=torch.float32).mean())
    if loss_cfg.ffl:
        total = total + loss_cfg.ffl * focal_frequency_loss(rec, images, loss_cfg.ffl_alpha)
    hog = loss_cfg.hog * (loss_cfg.hog_global_scale if global_path else 1.0)
    if hog:
        total = total + hog * hog_loss(rec, images, loss_cfg.hog_jitter)
    return total


def focal_frequency_loss(rec, images, alpha: float = 1.0):
    """Squared errors of the 2D spectra (orthonormal FFT per channel), each weighted by its own
    magnitude to the power `alpha`, normalised by the image's largest and not differentiated:
    the frequencies the decoder gets most wrong (edges, textures) count most (Jiang et al.,
    "Focal Frequency Loss for Image Reconstruction and Synthesis", 2021)."""
    diff = torch.fft.fft2(rec.float(), norm="ortho") - torch.fft.fft2(images.float(), norm="ortho")
    dist = diff.real.square() + diff.imag.square()
    with torch.no_grad():
        w = dist.sqrt().pow(alpha)
        w = w / w.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (w * dist).mean()


def hog_features(images, cell: int = 4, bins: int = 9, sigma: float = 1.0, eps: float = 2.0,
                 sharpness: int = 4, offset: tuple = (0, 0)):
    """Differentiable histograms of oriented gradients (after Dalal and Triggs, 2005) of [B,C,H,W]
    images in [-1,1]: [B, bins, H/cell, W/cell]. Each channel is smoothed by a Gaussian of std
    `sigma` (so that pixel noise does not decide the orientations), differentiated by central
    differences, and every pixel votes for the unsigned orientation bins with its gradient's
    magnitude times cos(2 * angle difference)^`sharpness` (a smooth stand-in for hard bins, with
    no atan2). Votes of all channels are summed per cell; each cell's histogram is divided by
    sqrt(|h|^2 + eps^2), so edges count by their shape more than by their contrast, while cells
    whose gradients are far below `eps` (flat or noisy ones) stay near 0. With `offset`
    (dy, dx), 0 <= dy, dx < cell, the cells start that many pixels down and right, and the
    incomplete ones at the borders are left out."""
    if images.dim() != 4 or images.shape[-1] % cell or images.shape[-2] % cell:
        raise ValueError(f"images must be [B,C,H,W] with H and W multiples of cell={cell}, got "
                         f"{tuple(images.shape)}")
    dy, dx = offset
    if not (0 <= dy < cell and 0 <= dx < cell):
        raise ValueError(f"offset must be two integers in [0, cell={cell}), got {offset}")
    x = gaussian_blur(images.float(), 2 * max(1, math.ceil(2.5 * sigma)) + 1, sigma, same=True)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) / 2
    gy = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) / 2
    m2 = gx.square() + gy.square() + 1e-6
    # the gradient's doubled angle as a unit vector: unsigned orientations, period pi
    cos2, sin2 = (gx.square() - gy.square()) / m2, 2 * gx * gy / m2
    phi = torch.arange(bins, device=x.device, dtype=x.dtype) * (2 * math.pi / bins)
    tune = (cos2.unsqueeze(2) * phi.cos().view(-1, 1, 1) + sin2.unsqueeze(2) * phi.sin().view(-1, 1, 1))
    votes = (m2.sqrt().unsqueeze(2) * tune.clamp_min(0).pow(sharpness)).sum(1)
    h = F.avg_pool2d(votes[..., dy:, dx:], cell) * cell * cell  # floor: drops incomplete cells
    return h / (h.square().sum(1, keepdim=True) + eps * eps).sqrt()


def hog_loss(rec, images, jitter: bool = False, cell: int = 4):
    """Mean absolute difference of the reconstruction's and the image's :func:`hog_features`: a
    weight-free perceptual term on outlines and their orientations, the target MAETok's auxiliary
    decoders predict (Chen et al., 2025). `jitter`: the cells start at a random offset drawn
    for each call (the same for both images), so that a pattern locked to a fixed cell grid,
    which is also the patch grid, does not lower the loss."""
    offset = tuple(torch.randint(cell, (2,)).tolist()) if jitter else (0, 0)
    return (hog_features(rec, cell, offset=offset) - hog_features(images, cell, offset=offset)).abs().mean()


def _local_targets(model, images, enc):
    """The bootstrap decoder's targets: the encoder's own local tokens (stop-gradient), or an
    EMA teacher's when `config.ema_teacher > 0`."""
    if model.teacher is None:
        return enc.local_1d.detach(), enc.local_2d.detach()
    with torch.no_grad():
        t = model.teacher.encode(images)
    return t.local_1d, t.local_2d


def _boot_loss(b1, b2, t1, t2):
    return F.mse_loss(b1.float(), t1.float()) + F.mse_loss(b2.float(), t2.float())
