"""One call that measures a SelfBootTok model: reconstruction quality (PSNR, SSIM, rFID) on both
decoding paths, codebook and 1D-slot use, generation quality (gFID, Inception Score; with a
domain evaluator: class accuracy, domain FD, precision/recall and a guidance sweep) and
throughput."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from selfboottok.progress import track

from .fid import feature_stats, fid_from_features, frechet_distance, load_stats
from .generation import check_sampling, eval_mode, generation_metrics, guidance_sweep, sample_features
from .metrics import codebook_stats, inception_score, psnr, ssim

__all__ = ["evaluate_model", "real_features", "slot_evenness", "METRICS", "DOMAIN_METRICS"]

# what= names; "all" selects every one (the domain ones only when there is an evaluator)
METRICS = ("psnr", "ssim", "rfid", "gfid", "is", "codebook", "slots", "throughput",
           "class_acc", "domain_fd", "prec_recall")
DOMAIN_METRICS = ("class_acc", "domain_fd", "prec_recall")
RECONSTRUCTION_METRICS = {"psnr", "ssim", "rfid", "codebook", "slots", "throughput"}
GENERATION_METRICS = {"gfid", "is", "throughput", *DOMAIN_METRICS}
PATHS = ("full", "boot")  # decoding paths: true local tokens, or bootstrapped from the global ids


def _parse_what(what, have_evaluator: bool) -> set:
    if isinstance(what, str):
        what = (what,)
    what = {str(w).lower() for w in what}
    if "all" in what:
        return set(METRICS) - (set() if have_evaluator else set(DOMAIN_METRICS))
    unknown = sorted(what - set(METRICS))
    if unknown or not what:
        raise ValueError(f"what must be 'all' or a subset of {list(METRICS)}, got {sorted(what)}")
    domain = sorted(what & set(DOMAIN_METRICS))
    if domain and not have_evaluator:
        raise ValueError(f"what={domain} needs evaluator= (a DomainEvaluator, e.g. "
                         "selfboottok.eval.domain.domain_evaluator('synthetic', image_size))")
    return what


def _ref_stats(ref):
    if isinstance(ref, (str, Path)):
        return load_stats(ref)
    if isinstance(ref, dict) and "mu" in ref and "sigma" in ref:
        return ref["mu"], ref["sigma"]
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        return ref
    raise ValueError("ref_stats must be an .npz path, a dict with 'mu' and 'sigma', or a (mu, sigma) pair")


def _fid(feats, ref):
    """FID of features against reference features (a tensor) or statistics (mu, sigma)."""
    if isinstance(ref, torch.Tensor):
        return fid_from_features(feats, ref)
    return frechet_distance(*feature_stats(feats), *ref)


# ---------------------------------------------------------------------------------------------
# images of a dataset

def _subset(data, n, seed):
    """`data` (a dataset of (image, label) pairs or an image tensor [N,C,H,W]) cut to n items: a
    random subset chosen by `seed` (kept in dataset order) when it is larger, else all of it."""
    total = len(data)
    if total == 0:
        raise ValueError("dataset is empty")
    if total <= n:
        return data
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(total, generator=g)[:n].sort().values
    return data[idx] if isinstance(data, torch.Tensor) else Subset(data, idx.tolist())


def _head(data, n):
    return data[:n] if isinstance(data, torch.Tensor) else Subset(data, range(n))


def _image_batches(data, batch_size, desc, progress, shape=None):
    """Image batches [B,C,H,W] of `data`, checked against `shape` (C,H,W) when given."""
    if isinstance(data, torch.Tensor):
        batches = data.split(batch_size)
    else:
        batches = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in track(batches, desc, unit="batch", enabled=progress, leave=False):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"dataset images must be [{shape[0]},{shape[1]},{shape[2]}] to match the model, "
                             f"got {list(x.shape[1:])}")
        yield x


@torch.no_grad()
def real_features(data, *, extractor=None, evaluator=None, batch_size: int = 64,
                  progress: bool = True) -> dict:
    """Features of every image of `data` (a dataset of (image, label) pairs, or an image tensor
    [N,C,H,W] in [-1,1]): "inception" [N,D] from `extractor` (a FeatureExtractor) and "domain"
    [N,F] from `evaluator` (a DomainEvaluator); None for the one not given. Pass the result to
    `evaluate_model(real=...)` to measure several models against the same real images."""
    feats = {"inception": [], "domain": []}
    for x in _image_batches(data, int(batch_size), "real features", progress):
        if extractor is not None:
            feats["inception"].append(extractor.extract(x, batch_size, progress=False)[0])
        if evaluator is not None:
            feats["domain"].append(evaluator.features(x))
    return {k: torch.cat(v) if v else None for k, v in feats.items()}


def slot_evenness(mass) -> dict:
    """How evenly images spread over the 1D local slots, from `mass` [B,K] (K x each slot's
    share of the image; all ones when even): slot_entropy, the entropy of the shares over
    log K (1 = even), per image, averaged; slot_mass_min / slot_mass_max, the smallest and
    largest slot's mass per image, averaged; slot_mass_profile, the masses sorted in descending
    order per image, averaged."""
    mass = torch.as_tensor(mass).double()
    if mass.dim() != 2 or mass.shape[1] < 2:
        raise ValueError(f"mass must be [B,K] with K >= 2 slots, got {list(mass.shape)}")
    K = mass.shape[1]
    p = (mass / mass.sum(1, keepdim=True)).clamp_min(1e-12)
    entropy = (-(p * p.log()).sum(1) / math.log(K)).mean().item()
    profile = mass.sort(1, descending=True).values.mean(0)
    return {"slot_entropy": entropy, "slot_mass_min": mass.min(1).values.mean().item(),
            "slot_mass_max": mass.max(1).values.mean().item(), "slot_mass_profile": profile.tolist()}


# ---------------------------------------------------------------------------------------------
# the one call

@torch.no_grad()
def evaluate_model(model, dataset=None, what=("psnr", "rfid", "gfid"), n: int = 2000, extractor=None,
                   batch_size: int = 64, ref_stats=None, steps: int = 8, guidance: float = 1.0,
                   generator: str = "maskgit", seed: int = 0, progress: bool = True, *,
                   evaluator=None, real=None, n_ref=None, n_gen=None, rfid_paths=PATHS,
                   temperature: float = 1.0, k: int = 3, sweep_guidance=None) -> dict:
    """Evaluates `model` (a SelfBootTok) on up to `n` images of `dataset` ((image, label) pairs
    in [-1,1] at the model's size, or an image tensor; a random subset chosen by `seed` when it
    is larger, else all of it in order).

    `what` picks from METRICS (or "all"):
      psnr / ssim  both, on the full path (true local tokens) and the bootstrap path (global
                   ids only), over every evaluated image -> psnr, ssim, psnr_boot, ssim_boot
      rfid         FID of the reconstructions of the first n_ref images against their real
                   features, on the paths in `rfid_paths` -> rfid, rfid_boot (None off them)
      gfid         FID of n_gen samples against the real features, or `ref_stats` (.npz path,
                   {"mu","sigma"} or a pair) -> gfid; with it is_mean/is_std when the extractor
                   has logits (else None)
      is           the Inception Score alone -> is_mean, is_std
      codebook     usage and perplexity of the global ids -> codebook_usage, codebook_perplexity
      slots        evenness of the 1D local slots (`slot_evenness`) -> slot_entropy, ...
      throughput   rec_images_per_s (full-path reconstruction), gen_images_per_s (sampling:
                   ids -> pixels, without feature extraction)
      class_acc    the evaluator's class prediction on n_gen samples against their conditioning
                   label -> class_acc, class_acc_per_class
      domain_fd    Fréchet distance of samples and real images in the evaluator's feature space
      prec_recall  k-NN precision and recall there (k neighbours) -> precision, recall
    The domain metrics need `evaluator` (a DomainEvaluator for the model's dataset and size);
    "all" includes them only when it is given. Reconstruction passes always add the codebook
    and rec_images_per_s entries, generation passes gen_images_per_s. In baseline mode (no
    bootstrap decoder) the *_boot and slot entries are None.

    Samples: n_gen (default n) with balanced labels (i % num_classes), sampled by `generator`
    with `steps`, `guidance`, `temperature`, in batches of `batch_size`, batch b with seed
    seed + b. `sweep_guidance` (guidance values) adds guidance_sweep: one row of class_acc,
    domain_fd, precision and recall per value (see generation.guidance_sweep).

    Real reference: the first n_ref (default n) evaluated images, or `real`, precomputed
    features of them ({"inception": [n_ref,D], "domain": [n_ref,F]}, either key; see
    `real_features`), which then need no dataset unless reconstructions are asked for.
    `extractor`: a FeatureExtractor, a weights path, or None for the default Inception.
    The result also holds n, n_ref, n_generated, extractor and evaluator (what made the
    features), the sampling settings when it samples, and the gFID reference used."""
    what = _parse_what(what, evaluator is not None)
    cfg = model.config
    n, batch_size = int(n), int(batch_size)
    if n < 2:
        raise ValueError(f"n must be >= 2 (FID needs a covariance), got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_gen = n if n_gen is None else int(n_gen)
    if n_gen < 2:
        raise ValueError(f"n_gen must be >= 2, got {n_gen}")
    rfid_paths = tuple(rfid_paths)
    if not set(rfid_paths) <= set(PATHS):
        raise ValueError(f"rfid_paths must be a subset of {list(PATHS)}, got {list(rfid_paths)}")
    sweep = None if sweep_guidance is None else [float(g) for g in sweep_guidance]
    if sweep is not None and evaluator is None:
        raise ValueError("sweep_guidance needs evaluator= (a DomainEvaluator): the sweep reports class accuracy")
    ref = None if ref_stats is None else _ref_stats(ref_stats)
    want_rec = bool(what & RECONSTRUCTION_METRICS)
    want_gen = bool(what & GENERATION_METRICS)
    want_inception = bool(what & {"rfid", "gfid", "is"})
    need = {"inception": "rfid" in what or ("gfid" in what and ref is None),
            "domain": bool(what & set(DOMAIN_METRICS)) or sweep is not None}
    real, n_ref = _given_references(real, n_ref, n)

    if want_inception:
        from .inception import build_extractor

        extractor = build_extractor(extractor)
    out = {"n": 0, "n_ref": 0, "n_generated": 0, "extractor": extractor.name if want_inception else None,
           "evaluator": getattr(evaluator, "report", None) if need["domain"] else None,
           "mode": "selfboottok" if model.global_mode else "baseline", "image_size": cfg.image_size}
    sampling = {"generator": generator, "steps": int(steps), "temperature": float(temperature), "seed": int(seed)}
    if want_gen or sweep is not None:
        check_sampling(steps, batch_size, temperature)  # before the reconstruction pass
        if generator not in model.generators:
            raise ValueError(f"generator must be one of {list(model.generators)}, got {generator!r}")
        out.update(sampling, guidance=float(guidance))
    missing = [key for key in need if need[key] and real.get(key) is None]
    data = None
    if want_rec or missing:
        if dataset is None:
            raise ValueError(f"dataset is needed for {sorted(what & RECONSTRUCTION_METRICS) or 'the real features'}")
        data = _subset(dataset, n, seed)
        out["n"] = len(data)
    with eval_mode(model):
        if missing:
            n_ref = min(n_ref, len(data))
            if n_ref < 2:
                raise ValueError(f"need at least 2 dataset images, got {n_ref}")
            computed = real_features(_head(data, n_ref), batch_size=batch_size, progress=progress,
                                     extractor=extractor if "inception" in missing else None,
                                     evaluator=evaluator if "domain" in missing else None)
            real.update({key: computed[key] for key in missing})
        if any(need.values()):
            out["n_ref"] = n_ref
        if want_rec:
            _reconstruction_pass(model, data, what, extractor, real.get("inception"), rfid_paths,
                                 batch_size, progress, out)
        if want_gen:
            _generation_pass(model, what, n_gen, extractor, evaluator, real, ref, k, batch_size,
                             progress, {**sampling, "guidance": guidance}, out)
        if sweep is not None:
            out["guidance_sweep"] = guidance_sweep(model, evaluator, real["domain"], sweep, n=n_gen, k=k,
                                                   batch_size=batch_size, progress=progress, **sampling)
    if "gfid" in what:
        out["gfid_reference"] = "ref_stats" if ref is not None else f"{n_ref} real images"
    return out


def _given_references(real, n_ref, n):
    """The precomputed real features, checked, and the reference size they set."""
    real = dict(real or {})
    unknown = sorted(set(real) - {"inception", "domain"})
    if unknown:
        raise ValueError(f"real must map 'inception' and/or 'domain' to features, got keys {unknown}")
    real = {key: v for key, v in real.items() if v is not None}
    for key, v in real.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 2:
            raise ValueError(f"real[{key!r}] must be a [N,D] feature tensor, got "
                             f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if n_ref is None:
        n_ref = len(next(iter(real.values()))) if real else n
    n_ref = int(n_ref)
    for key, v in real.items():
        if len(v) != n_ref:
            raise ValueError(f"real[{key!r}] holds {len(v)} images' features, n_ref is {n_ref}")
    if n_ref < 2:
        raise ValueError(f"n_ref must be >= 2 (FID needs a covariance), got {n_ref}")
    return real, n_ref


def _reconstruction_pass(model, data, what, extractor, real_inception, rfid_paths, batch_size,
                         progress, out):
    cfg, boot = model.config, model.global_mode
    device = next(model.parameters()).device
    paths = {"full": "", "boot": "_boot"}  # path -> suffix of its keys
    n_fid = len(real_inception) if "rfid" in what else 0
    if n_fid > len(data):
        raise ValueError(f"rFID compares the reconstructions of the first {n_fid} images with their "
                         f"real features, but only {len(data)} images are evaluated")
    sums = {f"{m}{s}": 0.0 for m in ("psnr", "ssim") for s in paths.values()}
    feats = {p: [] for p in paths}
    ids_all, mass, rec_time, done = [], [], 0.0, 0
    for x in _image_batches(data, batch_size, "reconstruct", progress,
                            (cfg.channels, cfg.image_size, cfg.image_size)):
        x = x.to(device, torch.float32)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        t = model.tokenize(x)
        recs = {"full": model.decode(t.ids, t.local_1d, t.local_2d).float()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec_time += time.perf_counter() - t0
        if boot:
            recs["boot"] = model.decode(t.ids).float()
        ids_all.append(t.global_ids.cpu())
        for path, rec in recs.items():
            if what & {"psnr", "ssim"}:
                sums["psnr" + paths[path]] += psnr(rec, x).sum().item()
                sums["ssim" + paths[path]] += ssim(rec, x).sum().item()
            if path in rfid_paths and done < n_fid:
                feats[path].append(extractor.extract(rec[: n_fid - done], batch_size, progress=False)[0])
        if "slots" in what and boot:
            mass.append(model.tokenizer.encode(x).slot_mass.float().cpu())
        done += len(x)
    stats = codebook_stats(torch.cat(ids_all), cfg.vocab_size)
    out["codebook_usage"], out["codebook_perplexity"] = stats["usage"], stats["perplexity"]
    out["rec_images_per_s"] = done / max(rec_time, 1e-9)
    if what & {"psnr", "ssim"}:
        out.update({key: (total / done if boot or not key.endswith("_boot") else None)
                    for key, total in sums.items()})
    if "rfid" in what:
        for path, suffix in paths.items():
            out["rfid" + suffix] = _fid(torch.cat(feats[path]), real_inception) if feats[path] else None
    if "slots" in what:
        none = dict.fromkeys(("slot_entropy", "slot_mass_min", "slot_mass_max", "slot_mass_profile"))
        out.update(slot_evenness(torch.cat(mass)) if boot else none)


def _generation_pass(model, what, n_gen, extractor, evaluator, real, ref, k, batch_size, progress,
                     sampling, out):
    want_domain = what & set(DOMAIN_METRICS)
    want_inception = what & {"gfid", "is"}
    s = sample_features(model, n_gen, evaluator=evaluator if want_domain else None,
                        extractor=extractor if want_inception else None, batch_size=batch_size,
                        progress=progress, **sampling)
    out["n_generated"] = n_gen
    out["gen_images_per_s"] = n_gen / max(s["seconds"], 1e-9)
    if "gfid" in what:
        out["gfid"] = _fid(s["inception"], ref if ref is not None else real["inception"])
    if want_inception:
        if s["logits"] is not None:
            out["is_mean"], out["is_std"] = inception_score(s["logits"], splits=min(10, n_gen))
        else:
            out["is_mean"] = out["is_std"] = None
    if want_domain:
        out.update(generation_metrics(s, real["domain"], model.config.num_classes, k, want_domain))
