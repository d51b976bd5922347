"""The token ids of a whole dataset (what the generators model: ``model.tokenize(x).ids``),
computed once with a frozen tokenizer. In memory for one stage-2 generator job
(`tokenize_dataset`), or on disk for many (`write_ids`, the `selfboottok tokenize` command):
shards ``ids-NNNNN.npy`` and ``labels-NNNNN.npy`` beside a ``manifest.json`` that names the
tokenizer, read back by `IdsDataset` (`train stage2 --ids`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from selfboottok.progress import Progress

__all__ = ["tokenize_dataset", "write_ids", "IdsDataset", "read_manifest", "tokenizer_fingerprint",
           "MANIFEST"]

FORMAT, VERSION = "selfboottok-ids", 1
MANIFEST = "manifest.json"
# config fields that change the ids for the same weights (the rest of the tokenizer's
# structure shows in its parameters' names and shapes)
ID_FIELDS = ("image_size", "patch_size", "channels", "num_global", "num_local", "global_dim",
             "codebook_size", "quantizer", "fsq_levels", "query_init", "learned_global", "generator_tokens",
             "encoder")
# what must agree for a resumed `write_ids` to continue the same output
SAME_RUN = ("tokenizer", "source", "n", "shard_size", "seq_len", "vocab_size", "ids_dtype")


def tokenizer_fingerprint(model) -> str:
    """sha256 of what decides ``model.tokenize(x).ids``: the encoder, latent projection and
    quantizer parameters, and the config fields in ID_FIELDS."""
    cfg = model.config.to_dict()
    h = hashlib.sha256(json.dumps({k: cfg[k] for k in ID_FIELDS}, sort_keys=True).encode())
    tok = model.tokenizer
    for prefix, module in (("encoder", tok.encoder), ("to_code", tok.to_code), ("quantizer", tok.quantizer)):
        for name, p in module.named_parameters():
            t = p.detach().to("cpu").contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _batches(model, dataset, lo, hi, batch_size, device):
    """(ids [b, Q] int64, labels [b] int64) on the CPU for dataset[lo:hi], in order."""
    model.to(device).eval()
    part = dataset if (lo, hi) == (0, len(dataset)) else Subset(dataset, range(lo, hi))
    for images, labels in DataLoader(part, batch_size=batch_size, shuffle=False):
        yield model.tokenize(images.to(device)).ids.cpu(), torch.as_tensor(labels).long()


def tokenize_dataset(model, dataset, device=None, batch_size=64, progress=True) -> TensorDataset:
    """(ids int32, label) pairs of every image of `dataset`, in memory."""
    device = device or torch.device("cpu")
    ids, labels = [], []
    with Progress(len(dataset), "tokenize", unit="img", enabled=progress, leave=False) as bar:
        for i, y in _batches(model, dataset, 0, len(dataset), batch_size, device):
            ids.append(i.to(torch.int32))
            labels.append(y)
            bar.update(len(y))
    return TensorDataset(torch.cat(ids), torch.cat(labels))


def _ids_dtype(vocab_size):
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def _save_atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(folder: Path, manifest: dict):
    _save_atomic(folder / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _shard_names(s):
    return f"ids-{s:05d}.npy", f"labels-{s:05d}.npy"


def write_ids(model, dataset, out_dir, *, source: dict, shard_size=50_000, batch_size=64,
              device=None, progress=True) -> dict:
    """Tokenizes `dataset` into `out_dir` and returns the manifest. `source` describes the
    dataset (recorded, and compared on resume). Resumable: shards are written atomically, and
    a rerun with the same tokenizer, data and shard size keeps the finished ones; a folder
    holding another run's ids is refused."""
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out, n, shard_size = Path(out_dir), len(dataset), int(shard_size)
    if n == 0:
        raise ValueError("the dataset is empty")
    cfg = model.config
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_fingerprint(model),
                "source": source, "n": n, "shard_size": shard_size,
                "num_shards": math.ceil(n / shard_size), "seq_len": cfg.num_quantized,
                "vocab_size": cfg.vocab_size, "ids_dtype": _ids_dtype(cfg.vocab_size).name,
                "labels_dtype": "int64", "config": cfg.to_dict(), "complete": False}
    if (out / MANIFEST).is_file():
        old = read_manifest(out, complete=False)
        diff = [k for k in SAME_RUN if old.get(k) != manifest[k]]
        if diff:
            raise ValueError(f"{out} holds ids of another run (different {', '.join(diff)}); choose "
                             "another output folder or delete it")
        manifest = {**old, "complete": False}
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)
    todo = [s for s in range(manifest["num_shards"])
            if not all((out / name).is_file() for name in _shard_names(s))]
    left = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo)
    dtype = np.dtype(manifest["ids_dtype"])
    with Progress(n, "tokenize", initial=n - left, unit="img", enabled=progress) as bar:
        for s in todo:
            ids, labels = [], []
            for i, y in _batches(model, dataset, s * shard_size, min(n, (s + 1) * shard_size),
                                 batch_size, device or torch.device("cpu")):
                ids.append(i.numpy().astype(dtype))
                labels.append(y.numpy())
                bar.update(len(y))
            ids_name, labels_name = _shard_names(s)
            _save_atomic(out / labels_name, lambda f: np.save(f, np.concatenate(labels)))
            _save_atomic(out / ids_name, lambda f: np.save(f, np.concatenate(ids)))
    labels = [np.load(out / _shard_names(s)[1], mmap_mode="r") for s in range(manifest["num_shards"])]
    manifest.update(complete=True, max_label=int(max(y.max() for y in labels)))
    _write_manifest(out, manifest)
    return manifest


def read_manifest(folder, complete=True) -> dict:
    """The manifest of a `write_ids` folder; with `complete`, an unfinished one is an error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a folder written by "
                                "`selfboottok tokenize`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a selfboottok ids manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has ids format version {manifest.get('version')}, expected {VERSION}")
    if complete and not manifest.get("complete"):
        raise ValueError(f"the ids in {folder} are unfinished: run `selfboottok tokenize` again "
                         "with the same arguments to complete them")
    return manifest


class IdsDataset(Dataset):
    """``(ids int64 [Q], label)`` pairs from a `write_ids` folder, memory-mapped. With `model`,
    the ids are checked to come from its tokenizer (and to fit its generators)."""

    def __init__(self, folder, model=None):
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        if model is not None:
            self.check(model)
        self.shard_size = m["shard_size"]
        self.ids, self.labels = [], []
        for s in range(m["num_shards"]):
            want = min(m["n"], (s + 1) * self.shard_size) - s * self.shard_size
            arrays = []
            for name in _shard_names(s):
                try:
                    arrays.append(np.load(self.folder / name, mmap_mode="r"))
                except (OSError, ValueError) as exc:
                    raise ValueError(f"ids shard {self.folder / name} cannot be read ({exc})") from exc
            ids, labels = arrays
            if ids.shape != (want, m["seq_len"]) or labels.shape != (want,):
                raise ValueError(f"ids shard {s} in {self.folder} has shapes {ids.shape} and "
                                 f"{labels.shape}, expected {(want, m['seq_len'])} and {(want,)}")
            self.ids.append(ids)
            self.labels.append(labels)

    def check(self, model):
        m, cfg = self.manifest, model.config
        if m["tokenizer"] != tokenizer_fingerprint(model):
            raise ValueError(f"the ids in {self.folder} come from another tokenizer than this model's "
                             "(the fingerprints differ): tokenize the data again with the stage-1 model "
                             "this run starts from")
        if m["seq_len"] != cfg.num_quantized or m["vocab_size"] != cfg.vocab_size:
            raise ValueError(f"the ids in {self.folder} are {m['seq_len']} tokens over {m['vocab_size']} "
                             f"codes, the model's generators expect {cfg.num_quantized} over {cfg.vocab_size}")
        if m.get("max_label", 0) >= cfg.num_classes:
            raise ValueError(f"the ids in {self.folder} have labels up to {m['max_label']}, the model "
                             f"has {cfg.num_classes} classes")

    def __len__(self):
        return self.manifest["n"]

    def __getitem__(self, i):
        s, j = divmod(int(i), self.shard_size)
        return torch.from_numpy(self.ids[s][j].astype(np.int64)), int(self.labels[s][j])
