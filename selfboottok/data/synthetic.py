"""SyntheticShapes: a procedurally generated, class-conditional image set that needs no download.

Each image is one antialiased shape on a flat background. The class and a few *global* factors
(position, size, rotation, colours) set the layout; *local* factors (texture kind, frequency,
angle and phase, fine noise, edge width) set the fine detail. That is the global/local split
SelfBootTok claims to exploit (docs/design.md, section 1), and every factor is recorded so experiments
can probe what each token group carries.

Sample ``i`` is a pure function of ``(seed, split, i)``: its factors come from a counter-based hash
of that triple, its noise from a torch generator seeded by the hash (so it is reproducible within a
torch version), and rendering always runs over the same fixed chunks of indices, so a sample is
bit-identical whatever ``n`` is and in whatever order samples are read.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SyntheticShapes",
    "CLASS_NAMES",
    "TEXTURE_NAMES",
    "GLOBAL_FACTORS",
    "LOCAL_FACTORS",
    "SPLITS",
    "render_shapes",
]

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring",
               "star", "crescent", "heart", "frame", "bar")
TEXTURE_NAMES = ("none", "stripes", "checker", "dots")
# label is the shape kind; the rest place and colour it
GLOBAL_FACTORS = ("label", "pos_x", "pos_y", "size", "rotation", "hue", "bg_hue", "bg_brightness")
LOCAL_FACTORS = ("texture", "texture_freq", "texture_angle", "texture_phase", "noise_amp", "edge_width")
SPLITS = {"train": 1, "test": 2, "val": 3}

_CHUNK = 128  # render granularity; fixed so results never depend on n or read order
_SHAPE_SAT, _SHAPE_VAL, _BG_SAT, _TEX_CONTRAST = 0.75, 0.95, 0.35, 0.45

# factor -> (low, high) of its uniform draw; texture is an integer draw
_RANGES = {
    "pos_x": (-0.3, 0.3),          # shape centre, image spans [-1, 1]
    "pos_y": (-0.3, 0.3),
    "size": (0.35, 0.6),           # shape radius, same units
    "rotation": (-math.pi / 6, math.pi / 6),  # +-30 deg: unambiguous for every symmetric shape
    "hue": (0.0, 1.0),
    "bg_hue": (0.0, 1.0),
    "bg_brightness": (0.08, 0.4),
    "texture": (0, len(TEXTURE_NAMES)),
    "texture_freq": (5.0, 10.0),   # cycles across the image width
    "texture_angle": (0.0, math.pi),
    "texture_phase": (0.0, 2 * math.pi),
    "noise_amp": (0.0, 0.06),      # std of per-pixel noise, colours in [0, 1]
    "edge_width": (0.6, 2.5),      # edge ramp in pixels of a 32x32 image
}
_DRAWN = tuple(_RANGES)

# ---------------------------------------------------------------------------------------------
# counter-based hashing (splitmix64 finaliser)

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _sample_keys(seed: int, split: str, idx: np.ndarray) -> np.ndarray:
    base = _mix(_mix(np.array([seed % 2**64], dtype=np.uint64) ^ _GOLD) + np.uint64(SPLITS[split]))
    return _mix(base + _mix(idx.astype(np.uint64)))


def _uniform(keys: np.ndarray, counter: int) -> np.ndarray:
    h = _mix(keys ^ _mix(np.array([counter + 1], dtype=np.uint64) * _GOLD))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draw_factors(seed: int, split: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    keys = _sample_keys(seed, split, idx)
    out: dict[str, np.ndarray] = {"label": (idx % len(CLASS_NAMES)).astype(np.int64)}
    for k, name in enumerate(_DRAWN):
        lo, hi = _RANGES[name]
        u = _uniform(keys, k)
        out[name] = np.minimum(np.floor(u * hi), hi - 1).astype(np.int64) if name == "texture" else lo + (hi - lo) * u
    out["noise_key"] = keys
    return out


# ---------------------------------------------------------------------------------------------
# signed distances in the shape's unit frame (negative inside; y points down)

def _box(px, py, bx, by):
    qx, qy = np.abs(px) - bx, np.abs(py) - by
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _disc(px, py, r, cx=0.0, cy=0.0):
    return np.hypot(px - cx, py - cy) - r


def _polygon(px, py, verts):
    """Exact distance to a closed polygon, sign by the even-odd rule."""
    d2 = np.full(px.shape, np.inf, dtype=px.dtype)
    inside = np.zeros(px.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        d2 = np.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        crosses = (ay > py) != (by > py)
        x_at = ax + (py - ay) * ex / (ey if ey != 0 else 1e-12)
        inside ^= crosses & (px < x_at)
    return np.where(inside, -1.0, 1.0).astype(px.dtype) * np.sqrt(d2)


def _regular(n, radius, inner=None, start=-math.pi / 2):
    """Vertices of a regular polygon (or a star when `inner` is given), first vertex pointing up."""
    pts, k = [], 2 * n if inner else n
    for j in range(k):
        a = start + 2 * math.pi * j / k
        r = inner if inner and j % 2 else radius
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_TRIANGLE = _regular(3, 1.2, start=-math.pi / 2)
_TRIANGLE = [(x, y + 0.3) for x, y in _TRIANGLE]  # centre the bounding box
_STAR = _regular(5, 1.2, inner=0.5)
_HEART_TIP = [(-0.93, -0.05), (0.93, -0.05), (0.0, 1.0)]


def _sdf(label: int, px, py):
    if label == 0:  # circle
        return _disc(px, py, 0.95)
    if label == 1:  # square
        return _box(px, py, 0.82, 0.82)
    if label == 2:  # triangle
        return _polygon(px, py, _TRIANGLE)
    if label == 3:  # cross
        return np.minimum(_box(px, py, 1.0, 0.32), _box(px, py, 0.32, 1.0))
    if label == 4:  # ring
        return np.abs(np.hypot(px, py) - 0.78) - 0.22
    if label == 5:  # star
        return _polygon(px, py, _STAR)
    if label == 6:  # crescent: a disc minus a shifted disc
        return np.maximum(_disc(px, py, 1.0), -_disc(px, py, 0.85, 0.5, -0.3))
    if label == 7:  # heart: two lobes over a triangle
        lobes = np.minimum(_disc(px, py, 0.5, -0.47, -0.3), _disc(px, py, 0.5, 0.47, -0.3))
        return np.minimum(lobes, _polygon(px, py, _HEART_TIP))
    if label == 8:  # frame: a hollow square
        return np.abs(_box(px, py, 0.8, 0.8)) - 0.18
    if label == 9:  # bar
        return _box(px, py, 1.1, 0.3)
    raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")


# ---------------------------------------------------------------------------------------------
# rendering

def _hsv_to_rgb(h, s, v):
    """[B] arrays -> [B, 3]."""
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(out, axis=-1)


def _smooth01(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _texture(kind, freq, angle, phase, X, Y, size):
    """[B, S, S] texture darkening in [0, 1]."""
    B = kind.shape[0]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    f = (freq / 2.0)[:, None, None]  # cycles per unit of the [-1, 1] frame
    u = (X * ca + Y * sa) * f + (phase / (2 * math.pi))[:, None, None]
    v = (-X * sa + Y * ca) * f + (phase / (2 * math.pi))[:, None, None]
    t = np.zeros((B, size, size), dtype=np.float32)
    two_pi = np.float32(2 * math.pi)
    m = kind == 1
    if m.any():  # soft square-wave stripes
        t[m] = np.clip(0.5 + 1.2 * np.sin(two_pi * u[m]), 0, 1)
    m = kind == 2
    if m.any():
        t[m] = np.clip(0.5 + 2.0 * np.sin(two_pi * u[m]) * np.sin(two_pi * v[m]), 0, 1)
    m = kind == 3
    if m.any():  # antialiased dots on a square lattice
        du, dv = u[m] - np.floor(u[m]) - 0.5, v[m] - np.floor(v[m]) - 0.5
        r = np.sqrt(du * du + dv * dv)
        px_cycles = f[m] * (2.0 / size)  # one pixel, in cycles
        t[m] = np.clip(0.5 + (0.28 - r) / px_cycles, 0, 1)
    return t


def _gaussian_noise(keys: np.ndarray, size: int) -> np.ndarray:
    """[B, 3, S, S] standard normal noise; each sample's from a torch generator seeded by its key."""
    out = torch.empty(len(keys), 3, size, size)
    g = torch.Generator()
    for j, key in enumerate(keys.tolist()):
        g.manual_seed(key)
        torch.randn(3, size, size, generator=g, out=out[j])
    return out.numpy()


def render_shapes(factors: dict, image_size: int = 32) -> np.ndarray:
    """Render images from factor arrays (as in ``SyntheticShapes.factor_table()``; ``noise_key``
    seeds the fine noise and may be omitted for no noise). Returns float32 [B, 3, S, S] in [-1, 1].
    Use it to render controlled variations, e.g. the same sample with one factor changed."""
    f = {k: np.atleast_1d(np.asarray(v)) for k, v in factors.items()}
    missing = [k for k in GLOBAL_FACTORS + LOCAL_FACTORS if k not in f]
    if missing:
        raise ValueError(f"render_shapes: factors missing {missing}")
    B = len(f["label"])
    if any(len(v) != B for v in f.values()):
        raise ValueError(f"render_shapes: factor arrays must all have length {B}, got "
                         f"{ {k: len(v) for k, v in f.items()} }")
    S = int(image_size)
    if S < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    f32 = {k: f[k].astype(np.float32) for k in _DRAWN}
    label, texture = f["label"].astype(np.int64), f["texture"].astype(np.int64)

    c = ((np.arange(S, dtype=np.float32) + 0.5) * (2.0 / S) - 1.0).astype(np.float32)
    X, Y = c[None, None, :], c[:, None][None]  # [1, 1, S], [1, S, 1]: x right, y down

    # shape frame: translate, rotate by -rotation, scale by 1/size
    dx = X - f32["pos_x"][:, None, None]
    dy = Y - f32["pos_y"][:, None, None]
    cr, sr = np.cos(f32["rotation"])[:, None, None], np.sin(f32["rotation"])[:, None, None]
    inv = (1.0 / f32["size"])[:, None, None]
    px, py = (dx * cr + dy * sr) * inv, (-dx * sr + dy * cr) * inv
    dist = np.empty((B, S, S), dtype=np.float32)
    for lab in np.unique(label):
        m = label == lab
        dist[m] = _sdf(int(lab), px[m], py[m])
    dist *= f32["size"][:, None, None]  # back to image units

    # edge ramp, never narrower than ~0.7 rendered pixel so edges stay antialiased
    width = np.maximum(f32["edge_width"] * (2.0 / 32.0), 1.4 / S)[:, None, None]
    alpha = _smooth01(0.5 - dist / width)[:, None]  # [B, 1, S, S]

    fg = _hsv_to_rgb(f32["hue"], np.float32(_SHAPE_SAT), np.float32(_SHAPE_VAL)).astype(np.float32)
    bg = _hsv_to_rgb(f32["bg_hue"], np.float32(_BG_SAT), f32["bg_brightness"]).astype(np.float32)
    tex = _texture(texture, f32["texture_freq"], f32["texture_angle"], f32["texture_phase"], X, Y, S)
    shape_rgb = fg[:, :, None, None] * (1.0 - _TEX_CONTRAST * tex[:, None])
    img = shape_rgb - bg[:, :, None, None]
    img *= alpha
    img += bg[:, :, None, None]
    if "noise_key" in f:
        noise = _gaussian_noise(f["noise_key"].astype(np.uint64), S)
        noise *= f32["noise_amp"][:, None, None, None]
        img += noise
    np.clip(img, 0.0, 1.0, out=img)
    img *= 2.0
    img -= 1.0
    return img


class SyntheticShapes(Dataset):
    """`n` procedurally generated 10-class images; ``ds[i] -> (image [3,S,S] float32 in [-1,1], label)``.

    Rendered tensors are cached in memory chunk by chunk as they are first read (about
    ``12 * S * S`` bytes per sample). ``tensors()`` renders everything at once.
    """

    def __init__(self, n: int, seed: int = 0, image_size: int = 32, split: str = "train"):
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if int(image_size) != image_size or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.n, self.seed, self.image_size, self.split = int(n), int(seed), int(image_size), split
        self.classes = list(CLASS_NAMES)
        self.num_classes = len(CLASS_NAMES)
        self._table: dict[str, np.ndarray] | None = None
        n_chunks = -(-self.n // _CHUNK)
        self._cache: torch.Tensor | None = None
        self._done = np.zeros(n_chunks, dtype=bool)

    def __len__(self) -> int:
        return self.n

    def _index(self, i) -> int:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for SyntheticShapes of length {self.n}")
        return i

    # factors
    def factors(self, i: int) -> dict:
        """Generating factors of sample `i` (python scalars; ``texture`` indexes TEXTURE_NAMES)."""
        i = self._index(i)
        f = _draw_factors(self.seed, self.split, np.array([i], dtype=np.int64))
        return {k: v[0].item() for k, v in f.items()}

    def factor_table(self) -> dict[str, np.ndarray]:
        """One array per factor over all samples (plus ``noise_key``, the noise seed)."""
        if self._table is None:
            self._table = _draw_factors(self.seed, self.split, np.arange(self.n, dtype=np.int64))
        return {k: v.copy() for k, v in self._table.items()}

    @property
    def labels(self) -> np.ndarray:
        return np.arange(self.n, dtype=np.int64) % self.num_classes

    # rendering
    def _render_chunk(self, c: int) -> None:
        if self._cache is None:
            S = self.image_size
            self._cache = torch.empty(len(self._done) * _CHUNK, 3, S, S, dtype=torch.float32)
        idx = np.arange(c * _CHUNK, (c + 1) * _CHUNK, dtype=np.int64)  # always the full chunk
        imgs = render_shapes(_draw_factors(self.seed, self.split, idx), self.image_size)
        self._cache[c * _CHUNK:(c + 1) * _CHUNK] = torch.from_numpy(imgs)
        self._done[c] = True

    def __getitem__(self, i):
        i = self._index(i)
        c = i // _CHUNK
        if not self._done[c]:
            self._render_chunk(c)
        return self._cache[i].clone(), i % self.num_classes

    def tensors(self, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images [n,3,S,S] and labels [n] (int64). The images share memory with the cache:
        clone before modifying them in place. A progress bar shows when n >= 8192 (or `progress`)."""
        todo = np.flatnonzero(~self._done)
        if progress is None:
            progress = self.n >= 8192 and len(todo) > 1
        if len(todo):
            it = todo
            if progress:
                from selfboottok.progress import track

                it = track(todo, desc=f"rendering SyntheticShapes[{self.split}]", unit="chunk")
            for c in it:
                self._render_chunk(int(c))
        return self._cache[:self.n], torch.from_numpy(self.labels)

    def __repr__(self) -> str:
        return (f"SyntheticShapes(n={self.n}, seed={self.seed}, image_size={self.image_size}, "
                f"split={self.split!r})")
