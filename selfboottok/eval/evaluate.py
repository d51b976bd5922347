"""One call that measures a SelfBootTok model: reconstruction quality (PSNR, SSIM, rFID) on both
decoding paths, generation quality (gFID, Inception Score), codebook use and throughput."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from selfboottok.progress import Progress, track

from .fid import feature_stats, fid_from_features, frechet_distance, load_stats
from .metrics import codebook_stats, inception_score, psnr, ssim

__all__ = ["evaluate_model", "METRICS"]

# what= names; "all" selects every one
METRICS = ("psnr", "ssim", "rfid", "gfid", "is", "codebook", "throughput")


def _parse_what(what) -> set:
    if isinstance(what, str):
        what = (what,)
    what = {str(w).lower() for w in what}
    if "all" in what:
        return set(METRICS)
    unknown = sorted(what - set(METRICS))
    if unknown or not what:
        raise ValueError(f"what must be 'all' or a subset of {list(METRICS)}, got {sorted(what)}")
    return what


def _ref_stats(ref):
    if isinstance(ref, (str, Path)):
        return load_stats(ref)
    if isinstance(ref, dict) and "mu" in ref and "sigma" in ref:
        return ref["mu"], ref["sigma"]
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        return ref
    raise ValueError("ref_stats must be an .npz path, a dict with 'mu' and 'sigma', or a (mu, sigma) pair")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fid(feats, ref):
    """FID of features against reference features (a tensor) or statistics (mu, sigma)."""
    if isinstance(ref, torch.Tensor):
        return fid_from_features(feats, ref)
    return frechet_distance(*feature_stats(feats), *ref)


@torch.no_grad()
def evaluate_model(model, dataset, what=("psnr", "rfid", "gfid"), n: int = 1000, extractor=None,
                   batch_size: int = 64, ref_stats=None, steps: int = 8, guidance: float = 1.0,
                   generator: str = "maskgit", seed: int = 0, progress: bool = True) -> dict:
    """Evaluates `model` (a SelfBootTok) on up to `n` images of `dataset` ((image, label) pairs
    in [-1,1] at the model's size; a random subset chosen by `seed` when the set is larger).

    `what` picks from METRICS (or "all"):
      psnr / ssim  both, on the full path (true local tokens) and the bootstrap path
                   (global ids only) -> psnr, ssim, psnr_boot, ssim_boot (means over images)
      rfid         FID of reconstructions vs the originals -> rfid, rfid_boot
      gfid         FID of n generations (class labels i % num_classes, i.e. balanced) vs the
                   originals, or vs `ref_stats` (.npz path, {"mu","sigma"} or a pair) -> gfid;
                   with it is_mean/is_std when the extractor has logits (else None)
      is           the Inception Score alone -> is_mean, is_std
      codebook     usage and perplexity of the global ids -> codebook_usage, codebook_perplexity
      throughput   rec_images_per_s (full-path reconstruction), gen_images_per_s (sampling:
                   ids -> pixels, without feature extraction)
    Reconstruction passes always add the codebook and rec_images_per_s entries, generation
    passes gen_images_per_s. In baseline mode (no bootstrap decoder) the *_boot entries are None.
    `extractor`: a FeatureExtractor, a weights path, or None for the default Inception.
    The result also holds n, n_generated, extractor (its name), the sampling settings and the
    reference used for gFID."""
    what = _parse_what(what)
    cfg = model.config
    n, batch_size = int(n), int(batch_size)
    if n < 2:
        raise ValueError(f"n must be >= 2 (FID needs a covariance), got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    want_rec = bool(what & {"psnr", "ssim", "rfid", "codebook", "throughput"})
    want_gen = bool(what & {"gfid", "is", "throughput"})
    want_feats = bool(what & {"rfid", "gfid", "is"})
    want_pix = bool(what & {"psnr", "ssim"})
    boot = model.global_mode
    ref = None if ref_stats is None else _ref_stats(ref_stats)
    need_real = want_rec or ("gfid" in what and ref is None)

    if want_feats:
        from .inception import build_extractor

        extractor = build_extractor(extractor)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {"n": 0, "n_generated": 0, "extractor": extractor.name if want_feats else None,
           "mode": "selfboottok" if boot else "baseline", "image_size": cfg.image_size,
           "steps": int(steps), "guidance": float(guidance), "generator": generator, "seed": int(seed)}
    try:
        real_feats = None
        if need_real:
            real_feats = _reconstruction_pass(model, dataset, n, batch_size, seed, what, want_rec,
                                              want_pix, want_feats, boot, extractor, device, progress, out)
        if want_gen:
            _generation_pass(model, n, batch_size, steps, guidance, generator, seed, what, want_feats,
                             extractor, device, progress, out,
                             ref if ref is not None else real_feats)
        if "gfid" in what:
            out["gfid_reference"] = "ref_stats" if ref is not None else f"{out['n']} dataset images"
    finally:
        model.train(was_training)
    return out


def _reconstruction_pass(model, dataset, n, batch_size, seed, what, want_rec, want_pix, want_feats,
                         boot, extractor, device, progress, out):
    total = len(dataset)
    if total == 0:
        raise ValueError("dataset is empty")
    count = min(n, total)
    if count < 2:
        raise ValueError(f"need at least 2 dataset images, got {count}")
    if count < total:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(total, generator=g)[:count].sort().values.tolist()
        dataset = Subset(dataset, idx)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    cfg = model.config
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    sums = {k: 0.0 for k in ("psnr", "ssim", "psnr_boot", "ssim_boot")}
    feats = {"real": [], "rec": [], "rec_boot": []}
    ids_all, rec_time, done = [], 0.0, 0
    for batch in track(loader, "reconstruct", unit="batch", enabled=progress, leave=False):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"dataset images must be [{want[0]},{want[1]},{want[2]}] to match the model, "
                             f"got {list(x.shape[1:])}")
        x = x.to(device, torch.float32)
        B = x.shape[0]
        if want_feats:
            feats["real"].append(extractor.extract(x, batch_size, progress=False)[0])
        if want_rec:
            _sync(device)
            t0 = time.perf_counter()
            rec = model.reconstruct(x).float()
            _sync(device)
            rec_time += time.perf_counter() - t0
            ids_all.append(model.tokenize(x).global_ids.cpu())
            rec_boot = model.reconstruct(x, bootstrap=True).float() if boot else None
            if want_pix:
                sums["psnr"] += psnr(rec, x).sum().item()
                sums["ssim"] += ssim(rec, x).sum().item()
                if boot:
                    sums["psnr_boot"] += psnr(rec_boot, x).sum().item()
                    sums["ssim_boot"] += ssim(rec_boot, x).sum().item()
            if "rfid" in what:
                feats["rec"].append(extractor.extract(rec, batch_size, progress=False)[0])
                if boot:
                    feats["rec_boot"].append(extractor.extract(rec_boot, batch_size, progress=False)[0])
        done += B
    out["n"] = done
    if want_rec:
        stats = codebook_stats(torch.cat(ids_all), cfg.vocab_size)
        out["codebook_usage"], out["codebook_perplexity"] = stats["usage"], stats["perplexity"]
        out["rec_images_per_s"] = done / max(rec_time, 1e-9)
    if want_pix:
        for k in sums:
            out[k] = sums[k] / done if (boot or not k.endswith("_boot")) else None
    real = torch.cat(feats["real"]) if want_feats else None
    if "rfid" in what:
        out["rfid"] = _fid(torch.cat(feats["rec"]), real)
        out["rfid_boot"] = _fid(torch.cat(feats["rec_boot"]), real) if boot else None
    return real


def _generation_pass(model, n, batch_size, steps, guidance, generator, seed, what, want_feats,
                     extractor, device, progress, out, ref):
    C = model.config.num_classes
    labels = torch.arange(n) % C
    feats, logits, gen_time = [], [], 0.0
    bar = Progress(n, "generate", unit="img", enabled=progress, leave=False)
    for b, lab in enumerate(labels.split(batch_size)):
        _sync(device)
        t0 = time.perf_counter()
        imgs = model.generate(lab.tolist(), steps=steps, guidance=guidance, generator=generator,
                              seed=int(seed) + b).float()
        _sync(device)
        gen_time += time.perf_counter() - t0
        if want_feats:
            f, lg = extractor.extract(imgs, batch_size, progress=False)
            feats.append(f)
            if lg is not None:
                logits.append(lg)
        bar.update(len(lab))
    bar.close()
    out["n_generated"] = n
    out["gen_images_per_s"] = n / max(gen_time, 1e-9)
    if "gfid" in what:
        out["gfid"] = _fid(torch.cat(feats), ref)
    if what & {"gfid", "is"}:
        if logits:
            out["is_mean"], out["is_std"] = inception_score(torch.cat(logits), splits=min(10, n))
        else:
            out["is_mean"] = out["is_std"] = None
