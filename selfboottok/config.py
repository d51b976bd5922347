"""SelfBootTokConfig: every model and training setting, named presets, YAML/JSON files, overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["ViTConfig", "TrainConfig", "LossConfig", "SelfBootTokConfig", "ADDED_FIELDS"]

# fields added after models were first saved, each with the value that rebuilds a model saved
# before it (a saved config lists every field it had, so a missing one means an older model)
ADDED_FIELDS = {"local_2d_pixels": False, "bootstrap_norm": True, "unpack_codes": False}


@dataclass
class ViTConfig:
    """The size of one transformer (the encoder, the decoders or the generators)."""

    width: int = 128  # a multiple of 4 (2D sin-cos positions) and of `heads`
    depth: int = 2
    heads: int = 4  # head dim = width / heads: a multiple of 8, at most 128 (the attention kernels)
    mlp_ratio: float = 4.0


@dataclass
class LossConfig:
    """Weights of the reconstruction terms, applied to every reconstruction of both paths (the
    sum is then weighted by `w_rec` or `w_rec_boot`), and the optional discriminator."""

    l2: float = 1.0  # mean squared error
    l1: float = 1.0  # mean absolute error
    ssim: float = 0.0  # 1 - SSIM (11x11 Gaussian window)
    ffl: float = 0.0  # focal frequency loss: spectrum errors weighted by their own size
    ffl_alpha: float = 1.0
    # histograms of oriented gradients per 4x4 cell (training/losses.hog_loss): weight 1 lifted
    # the class read from global-only reconstructions from 0.733 to 0.788 (two seeds; the
    # baseline's from 0.710 to 0.788), full path -0.13 dB (docs/results/tokenizer-quality.md)
    hog: float = 1.0
    # the HOG term on the global path (global tokens + bootstrapped local ones) is scaled by this
    hog_global_scale: float = 1.0
    # each HOG term places its cells at a random offset instead of on the patch grid; off: at
    # weight 1 the global-only seams went from 1.33 to 1.29 and its class from 0.788 to 0.765
    # (two seeds; docs/results/tokenizer-quality.md)
    hog_jitter: bool = False
    # hinge-loss PatchGAN generator term; 0 trains no discriminator. 0.1 in the stage-2 decoder
    # job only (gan_start=1) lifted the full path's texture from 0.75 to 0.81 (seed 0;
    # docs/results/tokenizer-quality.md)
    gan: float = 0.1
    # the GAN term on the global path (global tokens + bootstrapped local ones) is scaled by
    # this. 3 in the stage-2 job lowered the global path's seams from 1.37 to 1.26 and cost the
    # full path 1.3 dB and 0.065 of texture through the shared pixel decoder (seed 0)
    gan_global_scale: float = 1.0
    # fraction of stage 1 before the discriminator joins; 1: only in the stage-2 decoder job
    gan_start: float = 1.0
    gan_adaptive: bool = True  # scale the GAN term by |grad rec| / |grad gan| at the last layer
    lecam: float = 0.001  # LeCam regularisation of the discriminator
    disc_width: int = 32
    disc_lr: float = 1e-4


@dataclass
class TrainConfig:
    """How a stage trains: optimiser, step budgets, logging and checkpoints."""

    batch_size: int = 64
    lr: float = 5e-4  # 1e-3 and above made the tiny tokenizer unstable on the embedded data
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 50
    stage1_steps: int = 1000
    stage2_steps: int = 1000
    # (choice) the first fraction of stage 1 trains only the global path (reconstruction from
    # the global tokens with bootstrapped local ones); the full path joins after it, so the
    # decoder cannot lean on the continuous local tokens from the start (docs/design.md, 5.2)
    global_warmup: float = 0.5
    # a stage-2 job that trains only the generators tokenizes the dataset once and trains on the
    # ids (exact: the tokenizer is frozen and the datasets have no random augmentation)
    cache_tokens: bool = True
    # the stage-2 decoder job also trains the pixel decoder on the true local tokens
    stage2_full_path: bool = True
    # stage 2 gives the global path a pixel decoder of its own (`global_path_decoder`), started
    # from the stage-1 model's shared one; stage 1 keeps one decoder for both paths. On: full
    # path 31.21 dB (from 29.66), texture 0.972 (from 0.903), global-only seams 1.14 (from 1.25),
    # global-only 23.67 dB and class 0.823 (from 23.69 / 0.811); two seeds,
    # bench/results/quality-amd-epyc-2-threads.md
    stage2_global_decoder: bool = True
    # peak LR of the stage-2 decoder job (bootstrap + pixel decoder on a frozen tokenizer):
    # with the stage-2 GAN, 2e-3 drew the full path's textures in 0.865 of the images, 1e-3 in
    # 0.843 and 5e-4 in 0.805 (seed 0)
    decoder_lr: float = 2e-3
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999  # of the exported weights, warmed up as (1 + step) / (10 + step)
    log_every: int = 25  # steps between metric lines
    sample_every: int = 250
    ckpt_every: int = 250
    num_workers: int = 0


@dataclass
class SelfBootTokConfig:
    """The method's settings (see docs/design.md, section 1). `generator_tokens="global"` is
    SelfBootTok; `"all"` is the TiTok-style baseline whose generator models K_g + K_l quantized
    tokens (no 2D local tokens, no bootstrap decoder)."""

    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    # K_g: 32 (from 16) lifted the global-only path by 1.15 dB and its class accuracy from 0.39
    # to 0.72 (docs/results/tokenizer-quality.md); each global token is then two patches' region
    num_global: int = 32  # K_g
    num_local: int = 8  # K_l, 1D local tokens
    global_dim: int = 8  # c_g, code dim (for FSQ: len(fsq_levels))
    codebook_size: int = 256  # V (for FSQ: prod(fsq_levels))
    quantizer: str = "vq"  # "vq" | "fsq"
    fsq_levels: tuple = (8, 8, 4)
    commitment: float = 0.25
    dead_code_steps: int = 10  # training forwards without a hit before a code is restarted
    local_dim: int = 16  # c_l
    # c_2 per patch: 24 (from 8), with the pixel map below and `head_local_2d`, lifted the full
    # path from 26.05 to 28.69 dB and its texture from 0.47 to 0.77; the global-only path's seams
    # rose from 1.19 to 1.28 (docs/results/tokenizer-quality.md)
    local_2d_dim: int = 24
    # the 2D local tokens also take a linear map of their patch's pixels, a direct path for the
    # detail beside the encoder's features
    local_2d_pixels: bool = True
    local_norm: str = "layer"  # fixed scale of the local tokens: "layer" | "rms" | "none"
    # the bootstrap decoder's predictions get that fixed scale too; False: they regress the
    # normalised targets freely, so what the global tokens cannot predict shrinks toward its
    # mean instead of being scaled back up to full size. False lifted the full path from 28.59
    # to 29.23 dB and its texture from 0.75 to 0.85 (seed 0)
    bootstrap_norm: bool = False
    # the global path (global tokens + bootstrapped local ones: what generation decodes) gets a
    # pixel decoder of its own, which stage 2 starts as a copy of the stage-1 model's shared one;
    # the full path keeps the shared one, so losses aimed at the global path do not reach it
    # (unused in baseline mode, which has no global path)
    global_path_decoder: bool = False
    alignment: str = "ot"  # "ot" | "avgpool" | "softmax"
    # "pooled": each quantized query starts from one region's mean patch embedding (content, no
    # positions), and the decoders' grid cells from their region's code; learned queries were
    # slower to hold the layout (docs/results/tokenizer-quality.md)
    query_init: str = "pooled"
    # with "pooled": the last this many global tokens start from learned queries instead, free
    # of any one region, for image-wide factors (class, size, rotation)
    learned_global: int = 0
    # with "pooled": each grid cell of the decoders reads its region's code through its own map,
    # one per position inside the region, instead of the map all the region's cells share
    unpack_codes: bool = False
    ot_eps: float = 0.05
    ot_iters: int = 50
    softmax_tau: float = 0.1
    generator_tokens: str = "global"  # "global" (SelfBootTok) | "all" (baseline)
    generators: tuple = ("maskgit", "ar")
    ema_teacher: float = 0.0  # 0: stop-gradient targets; else EMA decay of a teacher encoder
    class_dropout: float = 0.1  # for classifier-free guidance
    # generators (models/generator.py; checked when they are built). How the class conditions
    # the transformer besides the prepended class token: "token" (nothing more), "add" (a class
    # embedding added to every token's input) or "adaln" (adaLN-zero modulation of every block;
    # the default: the class is worth most to both generators with it, docs/results/generators.md)
    generator_cond: str = "adaln"
    maskgit_min_mask: float = 0.0  # MaskGIT training masks at least this fraction of the tokens
    # sampling defaults, each also a keyword argument of the generators' `generate`:
    # "constant" guidance, or "linear": rising with the fraction of tokens fixed so far
    guidance_schedule: str = "constant"
    # MaskGIT: scale of the Gumbel noise on the confidences that pick the kept samples (annealed
    # to 0 over the rounds); None: the sampling temperature
    maskgit_choice_temperature: float | None = None
    # loss weights (training/losses.py)
    w_rec: float = 1.0  # reconstruction from the global and the true local tokens
    w_rec_boot: float = 1.0  # reconstruction from the global tokens and bootstrapped local ones
    w_boot: float = 1.0  # the bootstrap decoder's prediction of the local tokens
    w_quant: float = 1.0  # codebook and commitment terms
    w_align: float = 0.1  # OT alignment of the 1D local tokens
    seed: int = 0
    # the pixel decoder's output head: "linear" maps each token to its patch's pixels; "conv"
    # maps it to `head_channels` features per pixel, lays them out (depth-to-space) and refines
    # them with `head_blocks` residual 3x3 conv blocks, so neighbouring patches are drawn together
    decoder_head: str = "conv"
    head_channels: int = 32
    head_blocks: int = 1
    head_local_2d: bool = True  # conv head: the 2D local tokens also feed its feature map directly
    encoder_stem: int = 0  # > 0: a full-resolution conv stem of that many channels before patchify
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: ViTConfig = field(default_factory=ViTConfig)
    # depth 4 (from 2): global-only reconstructions 23.69 dB, class 0.811, seams 1.25 against
    # 23.51 / 0.788 / 1.33, full path 29.66 against 29.75 (two seeds, run t13;
    # bench/results/quality-screening/final-5e7de0b.md)
    bootstrap: ViTConfig = field(default_factory=lambda: ViTConfig(depth=4))
    generator: ViTConfig = field(default_factory=lambda: ViTConfig(128, 4, 4))
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        groups = {"train": TrainConfig, "loss": LossConfig}
        for name in ("encoder", "decoder", "bootstrap", "generator", "loss", "train"):
            sub = getattr(self, name)
            if isinstance(sub, dict):
                setattr(self, name, _build(groups.get(name, ViTConfig), sub, name))
        self.fsq_levels = tuple(self.fsq_levels)
        self.generators = tuple(self.generators)
        self.train.betas = tuple(self.train.betas)
        self.validate()

    # derived sizes
    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def vocab_size(self) -> int:
        if self.quantizer == "fsq":
            n = 1
            for level in self.fsq_levels:
                n *= level
            return n
        return self.codebook_size

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.global_dim

    @property
    def num_pooled(self) -> int:
        """Quantized tokens that start from a pooled region (the first ones)."""
        return self.num_quantized - self.learned_global if self.query_init == "pooled" else 0

    @property
    def num_quantized(self) -> int:
        """Tokens the tokenizer quantizes, and the generator's sequence length."""
        return self.num_global + (self.num_local if self.generator_tokens == "all" else 0)

    def validate(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"SelfBootTokConfig: {what}")

        need(self.image_size > 0 and self.patch_size > 0 and self.image_size % self.patch_size == 0,
             f"image_size ({self.image_size}) must be a positive multiple of patch_size ({self.patch_size})")
        need(self.quantizer in ("vq", "fsq"), f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        need(self.alignment in ("ot", "avgpool", "softmax"),
             f"alignment must be 'ot', 'avgpool' or 'softmax', got {self.alignment!r}")
        need(self.local_norm in ("layer", "rms", "none"),
             f"local_norm must be 'layer', 'rms' or 'none', got {self.local_norm!r}")
        need(self.decoder_head in ("linear", "conv"),
             f"decoder_head must be 'linear' or 'conv', got {self.decoder_head!r}")
        need(not self.head_local_2d or self.decoder_head == "conv",
             "head_local_2d needs decoder_head='conv'")
        need(self.encoder_stem >= 0, f"encoder_stem must be >= 0, got {self.encoder_stem}")
        need(self.head_channels >= 1 and self.head_blocks >= 0,
             f"head_channels must be >= 1 and head_blocks >= 0, got {self.head_channels}, {self.head_blocks}")
        for name in ("l2", "l1", "ssim", "ffl", "hog", "hog_global_scale", "gan", "gan_global_scale", "lecam"):
            need(getattr(self.loss, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self.loss, name)}")
        need(0 <= self.loss.gan_start <= 1, f"loss.gan_start must be in [0, 1], got {self.loss.gan_start}")
        need(self.query_init in ("learned", "pooled"),
             f"query_init must be 'learned' or 'pooled', got {self.query_init!r}")
        need(0 <= self.learned_global < self.num_global,
             f"learned_global must be in [0, num_global={self.num_global}), got {self.learned_global}")
        need(self.learned_global == 0 or self.query_init == "pooled",
             "learned_global needs query_init='pooled' (with 'learned' every query is learned)")
        need(self.generator_tokens in ("global", "all"),
             f"generator_tokens must be 'global' or 'all', got {self.generator_tokens!r}")
        need(len(self.generators) > 0 and all(g in ("maskgit", "ar") for g in self.generators),
             f"generators must be a non-empty subset of ('maskgit', 'ar'), got {self.generators}")
        for name in ("num_classes", "num_global", "num_local", "global_dim", "codebook_size",
                     "local_dim", "local_2d_dim", "ot_iters"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.ot_eps > 0, f"ot_eps must be > 0, got {self.ot_eps}")
        for name in ("lr", "decoder_lr"):
            need(getattr(self.train, name) >= 0, f"train.{name} must be >= 0, got {getattr(self.train, name)}")
        need(all(level >= 2 for level in self.fsq_levels), f"fsq_levels must be >= 2, got {self.fsq_levels}")
        need(0 <= self.ema_teacher < 1, f"ema_teacher must be in [0, 1), got {self.ema_teacher}")
        need(0 <= self.train.global_warmup < 1,
             f"train.global_warmup must be in [0, 1), got {self.train.global_warmup}")
        for name in ("encoder", "decoder", "bootstrap", "generator"):
            vit = getattr(self, name)
            need(vit.width % vit.heads == 0, f"{name}.width ({vit.width}) must be divisible by {name}.heads ({vit.heads})")
            head_dim = vit.width // vit.heads
            need(head_dim % 8 == 0 and head_dim <= 128,
                 f"{name} head dim (width/heads = {head_dim}) must be a multiple of 8 and <= 128")
            need(vit.width % 4 == 0 and vit.depth >= 1, f"{name} needs width % 4 == 0 and depth >= 1")

    # presets, files, overrides
    @classmethod
    def preset(cls, name: str, **overrides) -> "SelfBootTokConfig":
        """A named preset (`tiny`, `small`, `b64`) with overrides; nested fields by dotted name,
        e.g. ``preset("tiny", **{"encoder.depth": 4, "train.lr": 3e-4})``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict(_merge(cls.from_dict(PRESETS[name]).to_dict(), overrides))

    @classmethod
    def from_dict(cls, d: dict) -> "SelfBootTokConfig":
        """Fields missing from `d` keep their defaults."""
        return _build(cls, _merge(cls().to_dict(), d), "config")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_overrides(self, **overrides) -> "SelfBootTokConfig":
        return self.from_dict(_merge(self.to_dict(), overrides))

    def save(self, path) -> None:
        path = Path(path)
        text = (yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml")
                else json.dumps(self.to_dict(), indent=2))
        path.write_text(text)

    @classmethod
    def load(cls, path, **overrides) -> "SelfBootTokConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
        if "preset" in data:
            base = data.pop("preset")
            return cls.preset(base, **_merge(data, overrides))
        return cls.from_dict(_merge(cls().to_dict(), _merge(data, overrides)))

    @classmethod
    def load_saved(cls, path) -> "SelfBootTokConfig":
        """The config of a saved model: as `load`, except that a field the model predates takes
        the value it was built with (`ADDED_FIELDS`), not today's default."""
        path = Path(path)
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        older = {k: v for k, v in ADDED_FIELDS.items() if isinstance(data, dict) and k not in data}
        return cls.load(path, **older)


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def _merge(base: dict, overrides: dict) -> dict:
    """`base` updated by `overrides`, whose keys may be dotted ("encoder.depth") or nested dicts."""
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {key!r}: {part!r} is not a group of settings")
            node = node[part]
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _merge(node[last], value)
        else:
            node[last] = value
    return out


PRESETS: dict[str, dict] = {
    # 32x32, trains on a 2-core CPU in minutes
    "tiny": {},
    # 256x256 with 64 global tokens; ViT-B encoder and decoder (TiTok-B-64's backbone)
    "b64": {
        "image_size": 256, "patch_size": 16, "num_classes": 1000,
        "num_global": 64, "num_local": 48, "global_dim": 12, "codebook_size": 4096,
        # the plain 2D local tokens: the tiny preset's direct paths were not measured at 256
        "local_dim": 16, "local_2d_dim": 8, "local_2d_pixels": False, "head_local_2d": False,
        "encoder": {"width": 768, "depth": 12, "heads": 12},
        "decoder": {"width": 768, "depth": 12, "heads": 12},
        "bootstrap": {"width": 768, "depth": 8, "heads": 12},
        "generator": {"width": 768, "depth": 24, "heads": 16},
        "generators": ["maskgit"],
        "loss": {"gan": 0.0, "hog": 0.0},  # the tiny preset's GAN, HOG and LR were not measured at 256
        "train": {"batch_size": 256, "lr": 1e-4, "decoder_lr": 1e-4, "stage2_global_decoder": False,  # not measured at 256
                  "warmup_steps": 10000, "stage1_steps": 1000000,
                  "stage2_steps": 500000, "log_every": 100, "sample_every": 5000, "ckpt_every": 5000},
    },
}
