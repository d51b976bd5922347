"""Generation metrics judged by the domain evaluator (selfboottok.eval.domain): class accuracy of
samples against their conditioning labels (overall and per class), the domain Fréchet distance
to real images, precision and recall with k-nearest-neighbour manifolds (Kynkäänniemi et al.
2019) in the evaluator's feature space, and a guidance sweep of all three, plotted.

A "model" here is anything with ``generate(labels, steps=, guidance=, generator=, seed=,
temperature=)`` returning images in [-1,1] and ``config.num_classes`` (a SelfBootTok in either
mode, with either generator); an "evaluator" anything with ``features(images)`` and
``predict(images)["label"]`` (a DomainEvaluator)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from selfboottok.progress import Progress

from .fid import fid_from_features

__all__ = ["balanced_labels", "check_sampling", "eval_mode", "sample_batches", "sample_features", "class_accuracy",
           "class_information",
           "precision_recall", "generation_metrics", "guidance_sweep", "plot_guidance_sweep",
           "GENERATION_KEYS"]

# the figures of generation_metrics, in the order reports show them
GENERATION_KEYS = ("class_acc", "domain_fd", "precision", "recall")


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels 0, 1, ..., C-1, 0, 1, ...: n samples, every class within one of n / C."""
    if int(n) < 1 or int(num_classes) < 1:
        raise ValueError(f"n and num_classes must be >= 1, got n={n}, num_classes={num_classes}")
    return torch.arange(int(n)) % int(num_classes)


@contextmanager
def eval_mode(model):
    """`model` in eval mode inside the block (dropout off), its previous mode restored after."""
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        yield model
    finally:
        if was_training is not None:
            model.train(was_training)


def check_sampling(steps, batch_size, temperature):
    """Raises ValueError for sampling settings no sampler takes."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


@torch.no_grad()
def sample_batches(model, labels, *, generator: str = "maskgit", steps: int = 8, guidance: float = 1.0,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = True,
                   desc: str = "generate", **options):
    """Yields (labels, images, seconds) for each batch of `labels`: batch b is sampled with seed
    `seed + b`, so a batch's images do not depend on the batches before it; `seconds` is the
    wall time of its sampling alone (GPU work synchronised). `options` go to `model.generate`
    (top_k, top_p, guidance_schedule, choice_temperature)."""
    check_sampling(steps, batch_size, temperature)
    labels = torch.as_tensor(labels).long().cpu()
    bar = Progress(len(labels), desc, unit="img", enabled=progress, leave=False)
    try:
        for b, lab in enumerate(labels.split(int(batch_size))):
            t0 = time.perf_counter()
            images = model.generate(lab.tolist(), steps=int(steps), guidance=float(guidance),
                                    generator=generator, seed=int(seed) + b, temperature=float(temperature),
                                    **options)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            seconds = time.perf_counter() - t0
            yield lab, images.float(), seconds
            bar.update(len(lab))
    finally:
        bar.close()


def sample_features(model, n: int, *, evaluator=None, extractor=None, batch_size: int = 64,
                    progress: bool = True, **sampling) -> dict:
    """Samples n images with balanced labels (see `sample_batches` for `sampling`: generator,
    steps, guidance, temperature, seed) and keeps only what the metrics read, batch by batch:
    labels [n]; domain features [n,F] and the evaluator's predicted classes [n] (with
    `evaluator`); Inception features [n,D] and logits (with `extractor`; logits None when it has
    none); seconds, the sampling time alone."""
    labels = balanced_labels(n, model.config.num_classes)
    if evaluator is not None:
        _check_classes(evaluator, model.config.num_classes)
    out = {"labels": labels, "domain": [], "predicted": [], "inception": [], "logits": [], "seconds": 0.0}
    for _, images, seconds in sample_batches(model, labels, batch_size=batch_size, progress=progress,
                                             **sampling):
        out["seconds"] += seconds
        if evaluator is not None:
            out["domain"].append(evaluator.features(images))
            out["predicted"].append(np.asarray(evaluator.predict(images)["label"]))
        if extractor is not None:
            feats, logits = extractor.extract(images, batch_size, progress=False)
            out["inception"].append(feats)
            if logits is not None:
                out["logits"].append(logits)
    out["domain"] = torch.cat(out["domain"]) if out["domain"] else None
    out["predicted"] = np.concatenate(out["predicted"]) if out["predicted"] else None
    out["inception"] = torch.cat(out["inception"]) if out["inception"] else None
    out["logits"] = torch.cat(out["logits"]) if out["logits"] else None
    return out


def class_accuracy(predicted, labels, num_classes: int) -> dict:
    """How often the predicted class is the conditioning label: class_acc over all samples and
    class_acc_per_class (a list of C values; None for a class with no samples)."""
    predicted, labels = np.asarray(predicted).reshape(-1), np.asarray(labels).reshape(-1)
    if len(predicted) != len(labels) or len(labels) == 0:
        raise ValueError(f"predicted and labels must be non-empty and of one length, got "
                         f"{len(predicted)} and {len(labels)}")
    hit = predicted == labels
    per_class = [float(hit[labels == c].mean()) if (labels == c).any() else None
                 for c in range(int(num_classes))]
    return {"class_acc": float(hit.mean()), "class_acc_per_class": per_class}


@torch.no_grad()
def class_information(model, ids, labels, repeats: int = 4) -> dict:
    """Per generator of `model`: ``test_nll``, its training loss (nats per token) on token ids
    [N, K] of real images with their labels, and ``class_nats``, how much larger that loss is
    with a wrong label (label + 1) under the same masks: what the class is worth to it, 0 when
    it ignores the class. Averaged over `repeats` mask draws."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if ids.dim() != 2 or len(ids) != len(labels):
        raise ValueError(f"ids must be [N, K] with one label per row, got {tuple(ids.shape)} and "
                         f"{len(labels)} labels")
    wrong = (labels + 1) % model.config.num_classes
    out = {}
    with eval_mode(model):
        for kind, gen in model.generators.items():
            right_nll, wrong_nll = 0.0, 0.0
            for r in range(int(repeats)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(r)
                    right_nll += gen.loss(ids, labels).item() / repeats
                    torch.manual_seed(r)
                    wrong_nll += gen.loss(ids, wrong).item() / repeats
            out[kind] = {"test_nll": right_nll, "class_nats": wrong_nll - right_nll}
    return out


def _as_f64(x, name) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().double()
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"{name} must be [N,D] features, got shape {list(x.shape)}")
    return x


def _knn_radii(feats, k, chunk):
    """Distance from each row to its k-th nearest other row."""
    radii = []
    for part in feats.split(chunk):
        d = torch.cdist(part, feats)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # [:, 0] is the row itself
    return torch.cat(radii)


def _covered(queries, points, radii, chunk):
    """Fraction of `queries` inside at least one ball (points[i], radii[i])."""
    inside = [(torch.cdist(part, points) <= radii[None]).any(1) for part in queries.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3, chunk: int = 256) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real`
    features ([N,D] each): each set's manifold is the union of balls around its points with
    radius the distance to the k-th nearest neighbour within the set. precision: the fraction of
    fake samples inside the real manifold; recall: the fraction of real samples inside the fake
    manifold. Euclidean distances in float64; `chunk` rows at a time."""
    real, fake = _as_f64(real, "real"), _as_f64(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} and {fake.shape[1]}")
    if int(k) < 1 or min(len(real), len(fake)) <= int(k):
        raise ValueError(f"k must be >= 1 and below the size of each set, got k={k} for "
                         f"{len(real)} real and {len(fake)} fake samples")
    k = int(k)
    return {"precision": _covered(fake, real, _knn_radii(real, k, chunk), chunk),
            "recall": _covered(real, fake, _knn_radii(fake, k, chunk), chunk)}


def generation_metrics(samples: dict, real_domain, num_classes: int, k: int = 3,
                       what=("class_acc", "domain_fd", "prec_recall")) -> dict:
    """The metrics `what` of `samples` (from `sample_features` with an evaluator) against the
    domain features of real images: class_acc and class_acc_per_class; domain_fd (the exact
    Fréchet distance of the two feature sets); precision and recall with k neighbours."""
    if samples.get("domain") is None:
        raise ValueError("samples holds no domain features: sample them with an evaluator")
    out = {}
    if "class_acc" in what:
        out.update(class_accuracy(samples["predicted"], samples["labels"], num_classes))
    if "domain_fd" in what:
        out["domain_fd"] = fid_from_features(samples["domain"], _as_f64(real_domain, "real_domain"))
    if "prec_recall" in what:
        out.update(precision_recall(real_domain, samples["domain"], k))
        out["prec_recall_k"] = int(k)
    return out


def guidance_sweep(model, evaluator, real_domain, guidances, *, n: int = 2000, k: int = 3,
                   batch_size: int = 64, path=None, progress: bool = True, **sampling) -> list:
    """Class accuracy, domain FD, precision and recall of n samples at each guidance value
    (every other setting fixed: see `sample_batches` for `sampling`, without guidance).
    Returns one row (a dict with the guidance and the figures) per value, in the given order;
    with `path`, also plots them there (`plot_guidance_sweep`)."""
    guidances = [float(g) for g in guidances]
    if not guidances:
        raise ValueError("guidances must hold at least one value")
    if "guidance" in sampling:
        raise ValueError("guidance_sweep sets the guidance itself: pass the values as guidances")
    rows = []
    with eval_mode(model):
        for g in guidances:
            s = sample_features(model, n, evaluator=evaluator, batch_size=batch_size, guidance=g,
                                progress=progress, desc=f"generate, guidance {g:g}", **sampling)
            rows.append({"guidance": g, **generation_metrics(s, real_domain, model.config.num_classes, k)})
    if path is not None:
        settings = ", ".join(f"{key} {value}" for key, value in sampling.items() if key != "seed")
        plot_guidance_sweep(rows, path, title=f"{n} samples per guidance" + (f"; {settings}" if settings else ""))
    return rows


def _check_classes(evaluator, num_classes):
    """The evaluator's class head must read the model's classes."""
    spec = getattr(evaluator, "heads_spec", {}).get("label")
    if spec is not None and int(spec[1]) != int(num_classes):
        raise ValueError(f"the domain evaluator tells {spec[1]} classes apart, the model generates "
                         f"{num_classes}: evaluate with the evaluator of the model's dataset")


def plot_guidance_sweep(rows, path, title: str = "") -> Path:
    """Three panels against the guidance: class accuracy (with chance, 1/C), domain FD, and
    precision and recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["guidance"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    chance = 1 / len(rows[0]["class_acc_per_class"])
    axes[0].axhline(chance, color="grey", lw=0.8, ls="--", label=f"chance ({chance:.2g})")
    axes[0].plot(g, [r["class_acc"] for r in rows], marker="o", label="samples")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("class accuracy")
    axes[0].legend(fontsize=8)
    axes[1].plot(g, [r["domain_fd"] for r in rows], marker="o", color="C1")
    axes[1].set_ylabel("domain FD (lower is better)")
    for key, color in (("precision", "C2"), ("recall", "C3")):
        axes[2].plot(g, [r[key] for r in rows], marker="o", color=color, label=key)
    axes[2].set_ylim(0, 1.02)
    axes[2].set_ylabel(f"k-NN precision / recall (k={rows[0]['prec_recall_k']})")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("guidance")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
