"""Linear probes: how much of a known factor a set of features carries linearly.

Closed-form ridge regression on standardised features, fit on one split and scored on another.
Continuous targets are scored by R² (1 = perfect, 0 = no better than the test mean; may go
negative), categorical ones by the accuracy of a least-squares one-vs-rest classifier (ridge
onto one-hot targets, argmax). The ridge strength is picked from a grid on a held-out part of
the training split, then the probe is refit on the whole training split. Computed in float64.

`mlp_probe` is the one-hidden-layer version (what a factor's non-linear read-out costs), and
`token_probes` runs either kind over a model's global and local tokens for the factors of the
synthetic set.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ridge_fit", "ridge_predict", "r2_score", "linear_probe", "mlp_probe", "factor_target",
           "token_features", "token_probes", "ALPHAS", "CIRCULAR"]

# ridge strengths, as multiples of the number of training samples (features are standardised)
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# circular factors of the synthetic set -> period; probed as the (cos, sin) of the phase
CIRCULAR = {"hue": 1.0, "bg_hue": 1.0, "texture_angle": math.pi, "texture_phase": 2 * math.pi}
CATEGORICAL = ("label", "texture")
TEXTURED_ONLY = ("texture_freq", "texture_angle", "texture_phase")  # undefined without a texture


def _f64(x, name, ndim) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1 and ndim == 2:
        x = x[:, None]
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}D, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def ridge_fit(x, y, alpha: float) -> dict:
    """Ridge regression of targets `y` [N,T] (or [N]) on features `x` [N,D]. Features are
    standardised with the training mean/std (constant columns are left at 0); the intercept
    is not penalised. Returns the fitted parameters for :func:`ridge_predict`."""
    x, y = _f64(x, "x", 2), _f64(y, "y", 2)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"x and y need the same number (>= 2) of rows, got {x.shape[0]} and {y.shape[0]}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    xs = (x - mean) / std
    y_mean = y.mean(0)
    n, d = xs.shape
    if d <= n:  # primal: (X^T X + a I) W = X^T Y
        w = np.linalg.solve(xs.T @ xs + alpha * np.eye(d), xs.T @ (y - y_mean))
    else:  # dual, cheaper when there are more features than samples
        w = xs.T @ np.linalg.solve(xs @ xs.T + alpha * np.eye(n), y - y_mean)
    return {"mean": mean, "std": std, "w": w, "b": y_mean}


def ridge_predict(params: dict, x) -> np.ndarray:
    x = _f64(x, "x", 2)
    if x.shape[1] != params["w"].shape[0]:
        raise ValueError(f"x has {x.shape[1]} features, the probe was fit on {params['w'].shape[0]}")
    return ((x - params["mean"]) / params["std"]) @ params["w"] + params["b"]


def r2_score(pred, target) -> float:
    """Coefficient of determination, averaged over target columns (each column's R² against
    its own mean)."""
    pred, target = _f64(pred, "pred", 2), _f64(target, "target", 2)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {list(pred.shape)} and {list(target.shape)}")
    ss_res = ((target - pred) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    return float(np.mean(1.0 - ss_res / np.maximum(ss_tot, 1e-12)))


def _one_hot(labels, classes):
    return (labels[:, None] == classes[None, :]).astype(np.float64)


def _score(params, x, y, kind, classes):
    pred = ridge_predict(params, x)
    if kind == "regression":
        return r2_score(pred, y)
    return float((classes[pred.argmax(1)] == y).mean())


def _probe_data(train_x, train_y, test_x, test_y, kind):
    """Checked float64 features; the targets to fit (one-hot for classification), the classes
    and the chance score."""
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    train_x, test_x = _f64(train_x, "train_x", 2), _f64(test_x, "test_x", 2)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x and test_x feature counts differ: {train_x.shape[1]} and {test_x.shape[1]}")
    if kind == "classification":
        train_y, test_y = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
        if train_y.dtype.kind not in "iub" or test_y.dtype.kind not in "iub":
            raise ValueError("classification targets must be integer labels")
        classes = np.unique(train_y)
        fit_y = _one_hot(train_y, classes)
        counts = np.array([(train_y == c).sum() for c in classes])
        chance = float((test_y == classes[counts.argmax()]).mean())
    else:
        train_y, test_y = _f64(train_y, "train_y", 2), _f64(test_y, "test_y", 2)
        classes, fit_y, chance = None, train_y, 0.0
    if train_x.shape[0] != len(fit_y) or test_x.shape[0] != len(test_y):
        raise ValueError("features and targets need the same number of rows in each split")
    return train_x, train_y, test_x, test_y, fit_y, classes, chance


def _split(n, val_fraction, seed):
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"need at least 3 training samples to pick the probe's settings, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


def linear_probe(train_x, train_y, test_x, test_y, kind: str = "regression",
                 alphas=ALPHAS, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Fits a ridge probe on (train_x, train_y) and scores it on (test_x, test_y).

    kind="regression": targets [N] or [N,T] (e.g. cos/sin of an angle); score is R².
    kind="classification": integer labels [N]; score is accuracy, `chance` the accuracy of
    always guessing the most frequent training class.
    Returns {"score", "chance", "alpha" (the chosen strength, absolute), "kind", "n_train",
    "n_test"}."""
    train_x, train_y, test_x, test_y, fit_y, classes, chance = _probe_data(train_x, train_y, test_x, test_y, kind)
    n = train_x.shape[0]
    fit_idx, val_idx = _split(n, val_fraction, seed)
    val_y = fit_y[val_idx] if kind == "regression" else train_y[val_idx]
    best = None
    for rel in alphas:
        alpha = rel * len(fit_idx)
        params = ridge_fit(train_x[fit_idx], fit_y[fit_idx], alpha)
        if kind == "regression":  # MSE: R² is undefined on a tiny validation split
            s = -float(((ridge_predict(params, train_x[val_idx]) - val_y) ** 2).mean())
        else:
            s = _score(params, train_x[val_idx], val_y, kind, classes)
        if best is None or s > best[0]:
            best = (s, rel)
    alpha = best[1] * n
    params = ridge_fit(train_x, fit_y, alpha)
    return {"score": _score(params, test_x, test_y, kind, classes), "chance": chance,
            "alpha": float(alpha), "kind": kind, "n_train": int(n), "n_test": int(test_x.shape[0])}


def mlp_probe(train_x, train_y, test_x, test_y, kind: str = "regression", hidden: int = 256,
              steps: int = 1500, lr: float = 3e-3, weight_decay: float = 1e-2,
              val_fraction: float = 0.2, seed: int = 0) -> dict:
    """A probe with one hidden layer (`hidden` GELU units) on standardised features, trained
    full-batch with AdamW (cross-entropy or MSE on standardised targets). The number of steps
    is picked on a held-out part of the training split (checked every 100 steps), then the
    probe is retrained on the whole split for that many. Scores and return value as
    :func:`linear_probe` (with "steps" instead of "alpha"). Seeded: the same inputs give the
    same score."""
    train_x, train_y, test_x, test_y, fit_y, classes, chance = _probe_data(train_x, train_y, test_x, test_y, kind)
    n = train_x.shape[0]
    fit_idx, val_idx = _split(n, val_fraction, seed)
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    if kind == "regression":
        y_mean, y_std = fit_y.mean(0), np.where(fit_y.std(0) > 1e-12, fit_y.std(0), 1.0)
        target = (fit_y - y_mean) / y_std
    else:
        target = np.searchsorted(classes, train_y)

    def fit(idx, n_steps, check_idx=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.as_tensor((train_x[idx] - mean) / std, dtype=torch.float32)
        y = torch.as_tensor(target[idx])
        out_dim = len(classes) if kind == "classification" else target.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                                  torch.nn.Linear(hidden, out_dim))
        with torch.no_grad():
            for m in net:
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.weight.shape[1] ** -0.5)
                    m.bias.zero_()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.functional.cross_entropy if kind == "classification" else torch.nn.functional.mse_loss
        trail = []
        for step in range(1, n_steps + 1):
            loss = loss_fn(net(x), y.float() if kind == "regression" else y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if check_idx is not None and step % 100 == 0:
                trail.append((-score(net, train_x[check_idx], train_y[check_idx] if kind == "classification"
                                     else fit_y[check_idx]), step))
        return net, trail

    def score(net, x, y):
        with torch.no_grad():
            pred = net(torch.as_tensor((x - mean) / std, dtype=torch.float32)).double().numpy()
        if kind == "classification":
            return float((classes[pred.argmax(1)] == y).mean())
        return r2_score(pred * y_std + y_mean, y) if len(y) > 1 else 0.0

    with torch.random.fork_rng(devices=[]):
        _, trail = fit(fit_idx, steps, val_idx)
        best_steps = min(trail)[1]
        net, _ = fit(np.arange(n), best_steps)
        test_score = score(net, test_x, test_y)
    return {"score": test_score, "chance": chance, "steps": int(best_steps), "kind": kind,
            "n_train": int(n), "n_test": int(test_x.shape[0]), "hidden": int(hidden)}


def factor_target(table: dict, name: str) -> np.ndarray:
    """A synthetic-set factor as a probe target: circular factors as (cos, sin) of the phase."""
    v = table[name]
    if name in CIRCULAR:
        a = 2 * math.pi * v / CIRCULAR[name]
        return np.stack([np.cos(a), np.sin(a)], 1)
    return v


@torch.no_grad()
def token_features(model, images, batch_size: int = 64) -> dict:
    """The features probes read: "global tokens" (the quantized codes of the ids the generator
    models, flattened; in baseline mode all K_g + K_l of them) and, in SelfBootTok mode,
    "local tokens" (1D and 2D local tokens, flattened). float64 numpy arrays."""
    glob_, loc = [], []
    for x in images.split(batch_size):
        t = model.tokenize(x)
        glob_.append(model.tokenizer.codes(t.ids).flatten(1).double())
        if t.local_1d is not None:
            loc.append(torch.cat([t.local_1d.flatten(1), t.local_2d.flatten(1)], 1).double())
    out = {"global tokens": torch.cat(glob_).cpu().numpy()}
    if loc:
        out["local tokens"] = torch.cat(loc).cpu().numpy()
    return out


def token_probes(model, train_images, train_table, test_images, test_table, factors, probe="linear",
                 sources=("global tokens", "local tokens")) -> dict:
    """factor -> source -> probe result (see :func:`linear_probe`), for each factor of the
    synthetic set in `factors` and each token group in `sources` the model has. Factors that
    only exist on textured images are probed on those. `probe`: "linear" or "mlp"."""
    fit = {"linear": linear_probe, "mlp": mlp_probe}[probe]
    tr, te = token_features(model, train_images), token_features(model, test_images)
    out = {}
    for name in factors:
        mtr = np.ones(len(train_table["label"]), bool)
        mte = np.ones(len(test_table["label"]), bool)
        if name in TEXTURED_ONLY:
            mtr, mte = train_table["texture"] > 0, test_table["texture"] > 0
        kind = "classification" if name in CATEGORICAL else "regression"
        ytr, yte = factor_target(train_table, name)[mtr], factor_target(test_table, name)[mte]
        out[name] = {src: fit(tr[src][mtr], ytr, te[src][mte], yte, kind) for src in sources if src in tr}
    return out
