"""ImageFolder: an ImageNet-layout directory (root/<class>/<image>) as a dataset of [-1, 1] tensors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import load_image

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "CorruptImageWarning"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class CorruptImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolder(Dataset):
    """Images under ``root/<class>/`` (searched recursively; extensions in IMAGE_EXTENSIONS, any
    case). Classes are the sorted folder names (or `classes`, in the given order) and labels are
    their indices. ``ds[i] -> (float32 [3, S, S] in [-1, 1], label)``: converted to RGB (alpha
    composited over `alpha_background`), short side resized to `image_size` (bicubic,
    antialiased), centre-cropped.

    Unreadable files never stop a run. With ``verify=True`` each file's header is opened once at
    construction (cheap) and failures are dropped. A file that still fails when read (e.g.
    truncated data) is skipped: ``ds[i]`` warns (CorruptImageWarning, naming the file) and returns
    the next readable sample. Either way the path is added to ``ds.skipped``. With DataLoader
    workers, files found bad while reading are recorded in the worker's copy only; the warnings
    still show.

    ``n`` (with ``seed``) keeps a random subset of n files, chosen before verification.
    """

    def __init__(self, root, image_size: int, classes=None, *, verify: bool = True, n: int | None = None,
                 seed: int = 0, alpha_background=(255, 255, 255)):
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"ImageFolder: root {str(root)!r} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"ImageFolder: root {str(root)!r} is not a directory")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"ImageFolder: image_size must be a positive integer, got {image_size!r}")
        self.root, self.image_size = root, int(image_size)
        self.alpha_background = tuple(alpha_background)

        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if classes is None:
            if not found:
                loose = [f for f in os.listdir(root) if _is_image(f)]
                hint = (f"; it holds {len(loose)} image(s) directly, put them in class folders"
                        if loose else "")
                raise ValueError(f"ImageFolder: no class folders in {str(root)!r} "
                                 f"(expected root/<class>/<image>){hint}")
            classes = found
        else:
            classes = list(classes)
            missing = [c for c in classes if c not in found]
            if not classes or missing or len(set(classes)) != len(classes):
                raise ValueError(f"ImageFolder: classes must be distinct folders of {str(root)!r}; "
                                 f"missing {missing}, available {found}")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.num_classes = len(classes)

        samples: list[tuple[str, int]] = []
        for c in classes:
            for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                samples += [(os.path.join(dirpath, f), self.class_to_idx[c])
                            for f in sorted(filenames) if _is_image(f)]
        if not samples:
            raise ValueError(f"ImageFolder: no images with extensions {IMAGE_EXTENSIONS} under "
                             f"the class folders of {str(root)!r}")
        if n is not None:
            if int(n) != n or n < 1:
                raise ValueError(f"ImageFolder: n must be a positive integer or None, got {n!r}")
            if n < len(samples):
                keep = np.sort(np.random.default_rng(seed).choice(len(samples), int(n), replace=False))
                samples = [samples[k] for k in keep]

        self.skipped: list[str] = []
        if verify:
            good = []
            for path, label in samples:
                try:
                    with Image.open(path) as im:
                        im.size  # header only
                    good.append((path, label))
                except Exception as err:  # any decoder error: skip, never crash
                    self._skip(path, err)
            samples = good
            if not samples:
                raise ValueError(f"ImageFolder: none of the images under {str(root)!r} could be read "
                                 f"({len(self.skipped)} skipped)")
        self.samples = samples
        self.targets = [label for _, label in samples]
        self._bad: set[int] = set()

    def _skip(self, path: str, err: Exception) -> None:
        if path not in self.skipped:
            self.skipped.append(path)
        warnings.warn(f"ImageFolder: skipping unreadable image {path}: {type(err).__name__}: {err}",
                      CorruptImageWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        """One file -> float32 [3, S, S] in [-1, 1]; raises if it cannot be decoded."""
        return load_image(path, self.image_size, self.alpha_background)

    def __getitem__(self, i):
        n = len(self.samples)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for ImageFolder of length {n}")
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            path, label = self.samples[j]
            try:
                return self.load(path), label
            except Exception as err:  # corrupt data: record it and fall through to the next file
                self._bad.add(j)
                self._skip(path, err)
        raise RuntimeError(f"ImageFolder: no readable image left under {str(self.root)!r} "
                           f"({len(self.skipped)} skipped)")

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, image_size={self.image_size}, "
                f"classes={self.num_classes}, images={len(self)}, skipped={len(self.skipped)})")
