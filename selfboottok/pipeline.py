"""SelfBootTok: tokenize, decode, reconstruct and generate with one object; save/load as
safetensors + JSON, from a local folder or the Hugging Face Hub. The training losses are in
`selfboottok.training.losses`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from huggingface_hub import ModelHubMixin
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


class SelfBootTok(nn.Module, ModelHubMixin, library_name="selfboottok",
                  tags=["image-tokenizer", "class-conditional-image-generation"]):
    """The whole method. ``config.generator_tokens="global"`` (default) is SelfBootTok;
    ``"all"`` is the TiTok-style baseline. Parameters are initialised from ``config.seed``.
    `save_pretrained` / `from_pretrained` / `push_to_hub` read and write model.safetensors +
    config.json (no pickle), in a local folder or a Hugging Face Hub repository."""

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
            # a copy: built without drawing random numbers, so the other modules' init is unchanged
            self.global_decoder = (copy.deepcopy(self.tokenizer.decoder)
                                   if self.global_mode and config.global_path_decoder else None)
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

    def pixel_decoder(self, bootstrapped: bool):
        """The pixel decoder of a path: with bootstrapped local tokens, the global path's own
        one when `config.global_path_decoder` is set; otherwise the tokenizer's."""
        if bootstrapped and self.global_decoder is not None:
            return self.global_decoder
        return self.tokenizer.decoder

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
        `global_ids` holds all K_g + K_l ids. When any local token is predicted, the global
        path's pixel decoder draws the image (see :meth:`pixel_decoder`)."""
        c = self.config
        ids = self._check_ids(global_ids, c.num_quantized, "global_ids")
        codes = self.tokenizer.codes(ids).to(self._dtype())
        bootstrapped = self.global_mode and (local_1d is None or local_2d is None)
        if bootstrapped:
            boot_1d, boot_2d = self.bootstrap(codes)
            local_1d = boot_1d if local_1d is None else local_1d
            local_2d = boot_2d if local_2d is None else local_2d
        if self.global_mode:
            B = ids.shape[0]
            for name, t, shape in (("local_1d", local_1d, (B, c.num_local, c.local_dim)),
                                   ("local_2d", local_2d, (B, c.num_patches, c.local_2d_dim))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        return self.pixel_decoder(bootstrapped)(codes, local_1d, local_2d).clamp(-1, 1)

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
                 temperature=1.0, top_k=None, top_p=None, **options):
        """Images in [-1,1], one per class label: generator -> ids -> (bootstrap) -> pixels.
        `options` go to the generator's own `generate` (`guidance_schedule`; MaskGIT:
        `choice_temperature`), overriding the config's sampling defaults."""
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
            ids = model.generate(labels, int(steps), guidance, temperature, rng, **options)
        else:
            ids = model.generate(labels, guidance, temperature, top_k, top_p, rng, **options)
        return self.decode(ids)

    # files
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        self.config.save(Path(save_directory) / CONFIG)
        save_model(self, str(Path(save_directory) / WEIGHTS))

    def save_pretrained(self, save_directory, *, config=None, model_card_kwargs=None) -> None:
        """Writes model.safetensors and config.json into `save_directory` (created if needed);
        `push_to_hub` also writes a model card (README.md), from `model_card_kwargs`."""
        if config is not None:
            raise ValueError("config: a SelfBootTok saves its own config; leave it None")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory)
        if model_card_kwargs is not None and not (directory / "README.md").exists():
            self.generate_model_card(**model_card_kwargs).save(directory / "README.md")

    def push_to_hub(self, repo_id: str, *, model_card_kwargs=None, **kwargs) -> str:
        """Uploads model.safetensors, config.json and a model card to the Hub repository
        `repo_id` (created if missing) in one commit; `kwargs` as in
        `huggingface_hub.ModelHubMixin.push_to_hub` (token, private, branch, commit_message,
        create_pr...). Returns the commit's URL."""
        return super().push_to_hub(repo_id, model_card_kwargs=model_card_kwargs or {}, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, map_location="cpu", *, revision=None,
                        cache_dir=None, force_download=False, token=None,
                        local_files_only=False) -> "SelfBootTok":
        """A model from a folder written by `save_pretrained`, or from a Hugging Face Hub
        repository id (``"owner/name"``; `revision`, `cache_dir`, `force_download`, `token`
        and `local_files_only` are passed to the download). A path that exists locally is
        always read as a folder."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token,
                                    map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", **_):
        from safetensors.torch import load_model

        directory = _model_folder(model_id, revision=revision, cache_dir=cache_dir,
                                  force_download=force_download, token=token,
                                  local_files_only=local_files_only)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a SelfBootTok model: {name} is missing")
        model = cls(SelfBootTokConfig.load_saved(directory / CONFIG))
        try:
            load_model(model, str(directory / WEIGHTS), strict=True, device=str(map_location))
        except Exception as exc:
            raise ValueError(f"{directory / WEIGHTS} does not match its config: {exc}") from exc
        return model.to(map_location).eval()


def _is_hub_id(name: str) -> bool:
    """``name`` or ``owner/name``, as the Hub accepts them, and not written as a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _model_folder(name: str, **download) -> Path:
    """The local folder of a model: `name` itself when it exists, else a Hub download of
    config.json and model.safetensors (into the Hub cache)."""
    path = Path(name).expanduser()
    if path.exists() or not _is_hub_id(name):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a SelfBootTok model folder ({CONFIG} and {WEIGHTS}): "
                                    f"{'it is a file' if path.exists() else 'it does not exist'}")
        return path
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=[CONFIG, WEIGHTS], **download))
    except Exception as exc:
        raise FileNotFoundError(f"{name} is no local folder, and no model could be downloaded from the "
                                f"Hugging Face Hub repository {name!r}: {type(exc).__name__}: {exc}") from exc
