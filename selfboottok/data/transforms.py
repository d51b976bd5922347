"""PIL image -> model tensor helpers shared by the file-backed datasets."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["to_rgb", "resize_center_crop", "pil_to_tensor", "exif_upright",
           "load_image"]


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, palette with transparency) is composited over
    `background`; 16-bit and 32-bit grayscale are scaled down to 8 bits, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic; PIL filters antialias when shrinking), then
    take the central `size` x `size` square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"pil_to_tensor expects an RGB image, got mode {img.mode} with shape {a.shape}")
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (camera photos); a broken tag leaves the image as is."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not lose the image
        return img


def load_image(path, size: int, background=(255, 255, 255)) -> torch.Tensor:
    """One image file -> float32 [3, size, size] in [-1, 1] (upright, RGB, resized, center-
    cropped); raises FileNotFoundError or PIL's error when it cannot be read."""
    with Image.open(path) as im:
        im.load()
        img = to_rgb(exif_upright(im), background)
    return pil_to_tensor(resize_center_crop(img, size))
