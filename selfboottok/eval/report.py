"""Pictures people look at: image grids and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1,1] -> [N,H,W,3] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(rows, path, scale: int = 1, pad: int = 2) -> Path:
    """Saves a PNG grid. `rows` is a list of [N,C,H,W] tensors in [-1,1] (one grid row each,
    padded to the longest), or one [N,C,H,W] tensor laid out in rows of 8."""
    if isinstance(rows, torch.Tensor):
        rows = list(rows.split(8))
    rows = [to_uint8(r) for r in rows]
    n_cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = img
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def plot_curves(metrics_jsonl, path, title="", skip=("step", "lr", "time", "perplexity", "usage",
                                                     "gpu_mem_gb", "gpu_util")) -> Path:
    """One log-scale line per loss term of a metrics.jsonl file (not `skip`, not grad_norm*),
    against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    keys = [k for k in dict.fromkeys(k for r in records for k in r)  # terms may start late
            if k not in skip and not k.startswith("grad_norm")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
