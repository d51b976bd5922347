"""The training losses of both stages, as functions of a SelfBootTok model: stage 1 (the
tokenizer), stage 2 (generators and bootstrap decoder on frozen global tokens) and the
generators' cross-entropy on token ids. Each returns a dict of terms with the weighted total
under "loss"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["stage1_losses", "stage2_losses", "generator_losses", "PARTS"]

PARTS = ("generator", "bootstrap")


def stage1_losses(model, images, full_path: bool = True) -> dict:
    """Tokenizer losses: reconstruction from (global + true local) and from (global +
    bootstrapped local), bootstrap regression, quantizer and OT alignment. ``full_path=False``
    (SelfBootTok mode) leaves out the reconstruction from the true local tokens: the global
    warm-up of `train.global_warmup`."""
    c = model.config
    images = model._check_images(images, values=False)
    enc = model.tokenizer.encode(images)
    out = {"quant": enc.quant_loss.float(), "perplexity": enc.perplexity.detach(),
           "usage": enc.usage.detach()}
    total = c.w_quant * out["quant"]
    if full_path or not model.global_mode:
        rec = model.tokenizer.decoder(enc.codes, enc.local_1d, enc.local_2d)
        out["rec"] = F.mse_loss(rec.float(), images.float())
        total = total + c.w_rec * out["rec"]
    if model.global_mode:
        t1, t2 = _local_targets(model, images, enc)
        b1, b2 = model.bootstrap(enc.codes)
        rec_boot = model.tokenizer.decoder(enc.codes, b1, b2)
        out["rec_boot"] = F.mse_loss(rec_boot.float(), images.float())
        out["boot"] = _boot_loss(b1, b2, t1, t2)
        out["align"] = enc.align_loss.float()
        total = (total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
                 + c.w_align * out["align"])
    out["loss"] = total
    return out


def stage2_losses(model, images, labels, parts=PARTS) -> dict:
    """With the encoder and quantizer frozen: generator cross-entropy on the frozen ids (every
    generator in the config) and the decoder side: in SelfBootTok mode the bootstrap decoder and
    pixel decoder on the bootstrap path, in baseline mode the pixel decoder on the frozen codes.
    `parts` selects either side for separate jobs."""
    c = model.config
    images = model._check_images(images, values=False)
    labels = model._check_labels(labels, values=False)
    with torch.no_grad():
        enc = model.tokenizer.encode(images)
    out, total = {}, 0.0
    if "generator" in parts:
        out = generator_losses(model, enc.ids, labels)
        total = out.pop("loss")
    if "bootstrap" in parts and model.global_mode:
        b1, b2 = model.bootstrap(enc.codes)
        rec_boot = model.tokenizer.decoder(enc.codes, b1, b2)
        out["rec_boot"] = F.mse_loss(rec_boot.float(), images.float())
        out["boot"] = _boot_loss(b1, b2, enc.local_1d, enc.local_2d)
        total = total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
    elif "bootstrap" in parts:  # baseline: the same job fine-tunes its pixel decoder
        rec = model.tokenizer.decoder(enc.codes)
        out["rec"] = F.mse_loss(rec.float(), images.float())
        total = total + c.w_rec * out["rec"]
    out["loss"] = total if isinstance(total, torch.Tensor) else images.new_zeros(())
    return out


def generator_losses(model, ids, labels) -> dict:
    """Cross-entropy of every generator on the ids the generators model (`tokenize(x).ids`)."""
    ids = model._check_ids(ids, model.config.num_quantized, "ids", values=False)  # no host sync
    labels = model._check_labels(labels, values=False)
    out = {f"gen_{kind}": gen.loss(ids, labels) for kind, gen in model.generators.items()}
    out["loss"] = sum(out.values())
    return out


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
