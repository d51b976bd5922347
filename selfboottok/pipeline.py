"""SelfBootTok: tokenize, decode, reconstruct and generate with one object; the training losses
of both stages; save/load as safetensors + JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SelfBootTokConfig
from .models import BootstrapDecoder, Tokenizer, build_generator

__all__ = ["SelfBootTok", "TokenizeResult"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class TokenizeResult(NamedTuple):
    global_ids: torch.Tensor  # [B, K_g]
    local_1d: Optional[torch.Tensor]  # [B, K_l, c_l]; None in baseline mode
    local_2d: Optional[torch.Tensor]  # [B, N, c_2]; None in baseline mode
    ids: torch.Tensor  # what the generator models: global_ids, or all K_g + K_l ids (baseline)


class SelfBootTok(nn.Module):
    """The whole method. ``config.generator_tokens="global"`` (default) is SelfBootTok;
    ``"all"`` is the TiTok-style baseline. Parameters are initialised from ``config.seed``."""

    def __init__(self, config: Optional[SelfBootTokConfig] = None):
        super().__init__()
        config = SelfBootTokConfig.preset("tiny") if config is None else config
        if not isinstance(config, SelfBootTokConfig):
            raise ValueError(f"config must be a SelfBootTokConfig, got {type(config).__name__}")
        self.config = config
        self.global_mode = config.generator_tokens == "global"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.tokenizer = Tokenizer(config)
            self.bootstrap = BootstrapDecoder(config) if self.global_mode else None
            self.generators = nn.ModuleDict({k: build_generator(k, config) for k in config.generators})
        self.teacher = None
        if self.global_mode and config.ema_teacher > 0:
            self.teacher = copy.deepcopy(self.tokenizer).requires_grad_(False)

    # checks
    def _check_images(self, images, values=True):
        """Shape and dtype always; the [-1,1] range (a host sync) only when `values`: the
        training losses skip it, their datasets produce that range."""
        c = self.config
        want = (c.channels, c.image_size, c.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [B,{want[0]},{want[1]},{want[2]}] in [-1,1], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1,1], got {images.dtype}")
        if values and images.device.type != "meta":
            lo, hi = (x.item() for x in torch.aminmax(images))
            if not (lo >= -1.01 and hi <= 1.01):
                raise ValueError(f"images must be in [-1,1], got values in [{lo:.3g}, {hi:.3g}]")
        return images.to(self._dtype())

    def _check_ids(self, ids, n, name="global_ids", values=True):
        V = self.config.vocab_size
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != n:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be [B,{n}] integer ids, got {got}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer ids, got {ids.dtype}")
        if values and ids.device.type != "meta" and ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"{name} must be in [0, {V}), got [{ids.min().item()}, {ids.max().item()}]")
        return ids.long()

    def _check_labels(self, labels, values=True):
        if isinstance(labels, int):
            labels = [labels]
        labels = torch.as_tensor(labels, device=self._device())
        n = self.config.num_classes
        if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
            raise ValueError(f"class_labels must be a non-empty 1D list/tensor of ints, got {labels}")
        if values and labels.device.type != "meta" and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"class_labels must be in [0, {n}), got {labels.tolist()}")
        return labels.long()

    def _device(self):
        return next(self.parameters()).device

    def _dtype(self):
        return next(self.parameters()).dtype

    # inference
    @torch.no_grad()
    def tokenize(self, images) -> TokenizeResult:
        enc = self.tokenizer.encode(self._check_images(images))
        K_g = self.config.num_global
        return TokenizeResult(enc.ids[:, :K_g], enc.local_1d, enc.local_2d, enc.ids)

    @torch.no_grad()
    def decode(self, global_ids, local_1d=None, local_2d=None):
        """Images in [-1,1] from ids. In SelfBootTok mode, local tokens not given are predicted
        from the global ids by the bootstrap decoder (the generation path). In baseline mode,
        `global_ids` holds all K_g + K_l ids."""
        c = self.config
        ids = self._check_ids(global_ids, c.num_quantized, "global_ids")
        codes = self.tokenizer.codes(ids).to(self._dtype())
        if self.global_mode and (local_1d is None or local_2d is None):
            boot_1d, boot_2d = self.bootstrap(codes)
            local_1d = boot_1d if local_1d is None else local_1d
            local_2d = boot_2d if local_2d is None else local_2d
        if self.global_mode:
            B = ids.shape[0]
            for name, t, shape in (("local_1d", local_1d, (B, c.num_local, c.local_dim)),
                                   ("local_2d", local_2d, (B, c.num_patches, c.local_2d_dim))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        return self.tokenizer.decoder(codes, local_1d, local_2d).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images, bootstrap: bool = False):
        """Encode and decode; ``bootstrap=True`` drops the true local tokens and decodes from
        the global ids alone."""
        t = self.tokenize(images)
        if bootstrap or not self.global_mode:
            return self.decode(t.ids)
        return self.decode(t.ids, t.local_1d, t.local_2d)

    @torch.no_grad()
    def generate(self, class_labels, steps=8, guidance=0.0, generator="maskgit", seed=None,
                 temperature=1.0, top_k=None, top_p=None):
        """Images in [-1,1], one per class label: generator -> ids -> (bootstrap) -> pixels."""
        if generator not in self.generators:
            raise ValueError(f"generator must be one of {list(self.generators)}, got {generator!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        labels = self._check_labels(class_labels)
        rng = None
        if seed is not None:
            rng = torch.Generator(labels.device).manual_seed(int(seed))
        model = self.generators[generator]
        if generator == "maskgit":
            ids = model.generate(labels, int(steps), guidance, temperature, rng)
        else:
            ids = model.generate(labels, guidance, temperature, top_k, top_p, rng)
        return self.decode(ids)

    # training losses
    def stage1_losses(self, images, full_path: bool = True) -> dict:
        """Tokenizer losses: reconstruction from (global + true local) and from (global +
        bootstrapped local), bootstrap regression, quantizer and OT alignment. `loss` is the
        weighted total. ``full_path=False`` (SelfBootTok mode) leaves out the reconstruction
        from the true local tokens: the global warm-up of `train.global_warmup`."""
        c = self.config
        images = self._check_images(images, values=False)
        enc = self.tokenizer.encode(images)
        out = {"quant": enc.quant_loss.float(), "perplexity": enc.perplexity.detach(),
               "usage": enc.usage.detach()}
        total = c.w_quant * out["quant"]
        if full_path or not self.global_mode:
            rec = self.tokenizer.decoder(enc.codes, enc.local_1d, enc.local_2d)
            out["rec"] = F.mse_loss(rec.float(), images.float())
            total = total + c.w_rec * out["rec"]
        if self.global_mode:
            t1, t2 = self._local_targets(images, enc)
            b1, b2 = self.bootstrap(enc.codes)
            rec_boot = self.tokenizer.decoder(enc.codes, b1, b2)
            out["rec_boot"] = F.mse_loss(rec_boot.float(), images.float())
            out["boot"] = _boot_loss(b1, b2, t1, t2)
            out["align"] = enc.align_loss.float()
            total = (total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
                     + c.w_align * out["align"])
        out["loss"] = total
        return out

    def stage2_losses(self, images, labels, parts=("generator", "bootstrap")) -> dict:
        """With the encoder and quantizer frozen: generator cross-entropy on the frozen ids
        (every generator in the config) and, in SelfBootTok mode, the bootstrap decoder and
        pixel decoder on the bootstrap path. `parts` selects either side for separate jobs."""
        c = self.config
        images = self._check_images(images, values=False)
        labels = self._check_labels(labels, values=False)
        with torch.no_grad():
            enc = self.tokenizer.encode(images)
        out, total = {}, 0.0
        if "generator" in parts:
            out = self.generator_losses(enc.ids, labels)
            total = out.pop("loss")
        if "bootstrap" in parts and self.global_mode:
            b1, b2 = self.bootstrap(enc.codes)
            rec_boot = self.tokenizer.decoder(enc.codes, b1, b2)
            out["rec_boot"] = F.mse_loss(rec_boot.float(), images.float())
            out["boot"] = _boot_loss(b1, b2, enc.local_1d, enc.local_2d)
            total = total + c.w_rec_boot * out["rec_boot"] + c.w_boot * out["boot"]
        out["loss"] = total if isinstance(total, torch.Tensor) else images.new_zeros(())
        return out

    def generator_losses(self, ids, labels) -> dict:
        """Cross-entropy of every generator on the ids the generators model (`tokenize(x).ids`)."""
        ids = self._check_ids(ids, self.config.num_quantized, "ids", values=False)  # no host sync
        labels = self._check_labels(labels, values=False)
        out = {f"gen_{kind}": gen.loss(ids, labels) for kind, gen in self.generators.items()}
        out["loss"] = sum(out.values())
        return out

    def stage2_parameters(self, parts=("generator", "bootstrap")):
        """The parameters stage 2 trains: generators; bootstrap decoder + pixel decoder."""
        params = []
        if "generator" in parts:
            params += list(self.generators.parameters())
        if "bootstrap" in parts and self.global_mode:
            params += list(self.bootstrap.parameters()) + list(self.tokenizer.decoder.parameters())
        return params

    def _local_targets(self, images, enc):
        if self.teacher is None:
            return enc.local_1d.detach(), enc.local_2d.detach()
        with torch.no_grad():
            t = self.teacher.encode(images)
        return t.local_1d, t.local_2d

    @torch.no_grad()
    def update_teacher(self):
        """EMA step of the teacher tokenizer (when `config.ema_teacher > 0`)."""
        if self.teacher is None:
            return
        d = self.config.ema_teacher
        for t, s in zip(self.teacher.parameters(), self.tokenizer.parameters()):
            t.lerp_(s.detach(), 1 - d)

    # files
    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG)
        save_model(self, str(directory / WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "SelfBootTok":
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a SelfBootTok model: {name} is missing")
        model = cls(SelfBootTokConfig.load(directory / CONFIG))
        try:
            load_model(model, str(directory / WEIGHTS), strict=True, device=str(map_location))
        except Exception as exc:
            raise ValueError(f"{directory / WEIGHTS} does not match its config: {exc}") from exc
        return model.to(map_location).eval()


def _boot_loss(b1, b2, t1, t2):
    return F.mse_loss(b1.float(), t1.float()) + F.mse_loss(b2.float(), t2.float())
