"""The domain evaluator: a small CNN trained on a dataset's real training images to predict the
factors the dataset records (synthetic shapes: class, texture kind and the continuous global
factors; MNIST and labelled folders: the class). It judges images made by a model: factor
accuracy of reconstructions, class accuracy of generations, and the Fréchet distance between
real and generated images in its feature space ("domain FD"), which, unlike Inception FID on
32x32 synthetic images, separates good generators from bad ones at small scale.

It is trained once per (dataset, image size, recipe) and cached as safetensors + JSON under
``$SELFBOOTTOK_CACHE/domain`` (default ``~/.cache/selfboottok/domain``). Training is seeded
and single-threaded, so the same recipe gives the same weights on every run. The package ships
the default recipe's evaluators of the embedded synthetic set and of MNIST at 32x32 (in
`selfboottok/eval/weights/`, named as the cache names them), because training them takes
about ten minutes on one CPU core.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fid import fid_from_features

__all__ = ["DomainEvaluator", "domain_evaluator", "train_domain_evaluator", "RECIPE", "SYNTHETIC_HEADS"]

# bump when the network or its training changes, so cached evaluators are retrained
VERSION = 1
BUNDLED = Path(__file__).resolve().parent / "weights"
RECIPE = {"n_train": 20000, "n_test": 2000, "epochs": 8, "batch_size": 128, "lr": 2e-3,
          "weight_decay": 0.05, "width": 32, "seed": 0}
# factor -> (kind, size): "class" (categorical, size = classes), "reg" (standardised value),
# "circ" (a phase of period `size`, regressed as its cos and sin)
SYNTHETIC_HEADS = {"label": ("class", 10), "texture": ("class", 4), "pos_x": ("reg", 1),
                   "pos_y": ("reg", 1), "size": ("reg", 1), "rotation": ("reg", 1),
                   "hue": ("circ", 1.0), "bg_hue": ("circ", 1.0), "bg_brightness": ("reg", 1)}


def _outputs(kind, size) -> int:
    return int(size) if kind == "class" else (2 if kind == "circ" else 1)


class DomainEvaluator(nn.Module):
    """A VGG-style CNN (3x3 convolutions, batch norm, stride-2 stages down to 4x4, global
    average pooling) with one head per factor. ``features`` (the pooled activations) feed the
    domain FD; ``predict`` and ``score`` read the heads."""

    def __init__(self, image_size: int, channels: int, heads: dict, width: int = 32,
                 target_stats: Optional[dict] = None):
        super().__init__()
        self.image_size, self.channels = int(image_size), int(channels)
        self.heads_spec = {k: (v[0], v[1]) for k, v in heads.items()}
        self.target_stats = target_stats or {}  # reg factor -> (mean, std) of its training values
        layers, c_in, c, size = [], channels, width, image_size
        layers += _conv(c_in, c, 1)
        while size > 4:
            layers += _conv(c, c, 1) + _conv(c, 2 * c, 2)
            c, size = 2 * c, (size + 1) // 2
        self.body = nn.Sequential(*layers)
        self.feature_dim = c
        self.heads = nn.ModuleDict({k: nn.Linear(c, _outputs(*v)) for k, v in self.heads_spec.items()})
        self.report: dict = {}

    def forward(self, images):
        h = self.body(images).mean((2, 3))
        return h, {k: head(h) for k, head in self.heads.items()}

    def _batches(self, images, batch_size):
        _check_images(images, self.channels, self.image_size)
        device = next(self.parameters()).device
        for chunk in images.split(batch_size):
            yield chunk.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def features(self, images, batch_size: int = 256) -> torch.Tensor:
        """[N, feature_dim] float64 features of images [N,C,S,S] in [-1,1]."""
        self.eval()
        return torch.cat([self(x)[0].double().cpu() for x in self._batches(images, batch_size)])

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> dict:
        """factor -> numpy array: class ids for "class" heads, the value for the others (for
        circular factors, the phase in [0, period))."""
        self.eval()
        outs: dict = {k: [] for k in self.heads_spec}
        for x in self._batches(images, batch_size):
            for k, y in self(x)[1].items():
                outs[k].append(y.double().cpu())
        preds = {}
        for k, (kind, size) in self.heads_spec.items():
            y = torch.cat(outs[k]).numpy()
            if kind == "class":
                preds[k] = y.argmax(1)
            elif kind == "circ":
                preds[k] = (np.arctan2(y[:, 1], y[:, 0]) / (2 * math.pi) * size) % size
            else:
                mean, std = self.target_stats[k]
                preds[k] = y[:, 0] * std + mean
        return preds

    def score(self, images, factors: dict, batch_size: int = 256) -> dict:
        """How well the factors can be read back from `images`: accuracy for categorical
        factors, R² for continuous ones (circular ones over their cos and sin), against the
        true `factors` (name -> array of length N). Factors missing from `factors` are skipped."""
        preds = self.predict(images, batch_size)
        out = {}
        for k, (kind, size) in self.heads_spec.items():
            if k not in factors:
                continue
            true = np.asarray(factors[k])
            if len(true) != len(preds[k]):
                raise ValueError(f"factors[{k!r}] has {len(true)} values for {len(preds[k])} images")
            if kind == "class":
                out[k] = float((preds[k] == true).mean())
            elif kind == "circ":
                out[k] = _r2(_phase(true, size), _phase(preds[k], size))
            else:
                out[k] = _r2(true[:, None], preds[k][:, None])
        return out

    def class_accuracy(self, images, labels, batch_size: int = 256) -> float:
        return self.score(images, {"label": np.asarray(labels)}, batch_size)["label"]

    def frechet_distance(self, images, reference) -> float:
        """Domain FD between `images` and `reference`: each images [N,C,S,S] or features
        from :meth:`features` (exact for fewer samples than dimensions, see
        `fid_from_features`)."""
        return fid_from_features(self._features(images), self._features(reference))

    def _features(self, x):
        return self.features(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _conv(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


def _phase(v, period):
    a = 2 * math.pi * np.asarray(v, dtype=np.float64) / period
    return np.stack([np.cos(a), np.sin(a)], 1)


def _r2(true, pred) -> float:
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    ss_res = ((true - pred) ** 2).sum()
    ss_tot = ((true - true.mean(0)) ** 2).sum()
    return float(1 - ss_res / max(ss_tot, 1e-12))


def _check_images(images, channels, size):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be [N,{channels},{size},{size}] in [-1,1] for this evaluator, got {got}")


# ---------------------------------------------------------------------------------------------
# training and the cache

def _factor_table(dataset) -> dict:
    """name -> array over the dataset: every recorded factor of SyntheticShapes, else labels."""
    if hasattr(dataset, "factor_table"):
        return {k: v for k, v in dataset.factor_table().items() if k != "noise_key"}
    return {"label": np.asarray([int(dataset[i][1]) for i in range(len(dataset))])}


def _images(dataset) -> torch.Tensor:
    if hasattr(dataset, "tensors"):
        return dataset.tensors()[0].clone()
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _heads_for(dataset, table) -> dict:
    if hasattr(dataset, "factor_table"):
        return dict(SYNTHETIC_HEADS)
    n_classes = getattr(dataset, "num_classes", None) or int(table["label"].max()) + 1
    return {"label": ("class", int(n_classes))}


def train_domain_evaluator(train_set, test_set, recipe: Optional[dict] = None,
                           progress: bool = True) -> DomainEvaluator:
    """Trains an evaluator on `train_set` ((image, label) pairs; SyntheticShapes gives every
    factor) and records its scores on `test_set` in ``.report``. Seeded and run on one thread,
    so it is deterministic."""
    from selfboottok.progress import track

    recipe = {**RECIPE, **(recipe or {})}
    train_table, test_table = _factor_table(train_set), _factor_table(test_set)
    heads = _heads_for(train_set, train_table)
    x_train, x_test = _images(train_set), _images(test_set)
    stats = {k: (float(train_table[k].mean()), float(train_table[k].std()) or 1.0)
             for k, (kind, _) in heads.items() if kind == "reg"}
    targets = {}
    for k, (kind, size) in heads.items():
        v = np.asarray(train_table[k])
        if kind == "class":
            targets[k] = torch.as_tensor(v, dtype=torch.long)
        elif kind == "circ":
            targets[k] = torch.as_tensor(_phase(v, size), dtype=torch.float32)
        else:
            targets[k] = torch.as_tensor((v - stats[k][0]) / stats[k][1], dtype=torch.float32)[:, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order: the same weights every run
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            model = DomainEvaluator(x_train.shape[-1], x_train.shape[1], heads, recipe["width"], stats)
            g = torch.Generator().manual_seed(recipe["seed"])
            n, bs = len(x_train), recipe["batch_size"]
            steps_per_epoch = n // bs
            total = recipe["epochs"] * steps_per_epoch
            opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=total, pct_start=0.15)
            model.train()
            steps = track(range(total), desc="domain evaluator", unit="step", enabled=progress)
            order = None
            for step in steps:
                if step % steps_per_epoch == 0:
                    order = torch.randperm(n, generator=g)
                idx = order[(step % steps_per_epoch) * bs:(step % steps_per_epoch + 1) * bs]
                _, out = model(x_train[idx])
                loss = sum(F.cross_entropy(out[k], targets[k][idx]) if kind == "class"
                           else F.mse_loss(out[k], targets[k][idx])
                           for k, (kind, _) in heads.items())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.report = {"test_scores": model.score(x_test, test_table), "n_train": len(x_train),
                    "n_test": len(x_test), "recipe": recipe}
    return model


def _cache_dir(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("SELFBOOTTOK_CACHE", Path.home() / ".cache" / "selfboottok")
    return Path(root) / "domain"


def domain_evaluator(dataset: str = "synthetic", image_size: int = 32, recipe: Optional[dict] = None,
                     cache_dir=None, progress: bool = True) -> DomainEvaluator:
    """The evaluator of `dataset` ("synthetic", "mnist" or an image folder with class
    subfolders) at `image_size`: loaded from the cache, or trained (a minute or two on a CPU
    for the synthetic set) and cached. The training and test images are the dataset's own
    train and test splits, the synthetic ones drawn with the recipe's seed."""
    from safetensors.torch import load_file, save_file

    from selfboottok.data import build_dataset

    recipe = {**RECIPE, **(recipe or {})}
    name = str(dataset)
    key = json.dumps({"dataset": name, "image_size": int(image_size), "recipe": recipe,
                      "version": VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = _cache_dir(cache_dir)
    slug = "".join(ch if ch.isalnum() else "-" for ch in Path(name).name.lower())[:40]
    stem = f"{slug}-{image_size}-{digest}"
    weights, meta = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if not (weights.is_file() and meta.is_file()) and (BUNDLED / f"{stem}.json").is_file():
        weights, meta = BUNDLED / f"{stem}.safetensors", BUNDLED / f"{stem}.json"
    if weights.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        model = DomainEvaluator(info["image_size"], info["channels"], info["heads"], info["recipe"]["width"],
                                {k: tuple(v) for k, v in info["target_stats"].items()})
        model.load_state_dict(load_file(str(weights)))
        model.report = info["report"]
        return model.eval()
    seed = recipe["seed"]
    train_set = build_dataset(name, image_size, n=recipe["n_train"], seed=seed, split="train")
    test_set = build_dataset(name, image_size, n=recipe["n_test"], seed=seed, split="test")
    model = train_domain_evaluator(train_set, test_set, recipe, progress)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"dataset": name, "image_size": int(image_size), "channels": model.channels,
            "heads": model.heads_spec, "target_stats": model.target_stats, "recipe": recipe,
            "report": model.report, "version": VERSION}
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    meta.write_text(json.dumps(info, indent=1))
    return model
