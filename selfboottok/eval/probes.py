"""Linear probes: how much of a known factor a set of features carries linearly.

Closed-form ridge regression on standardised features, fit on one split and scored on another.
Continuous targets are scored by R² (1 = perfect, 0 = no better than the test mean; may go
negative), categorical ones by the accuracy of a least-squares one-vs-rest classifier (ridge
onto one-hot targets, argmax). The ridge strength is picked from a grid on a held-out part of
the training split, then the probe is refit on the whole training split. Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ridge_fit", "ridge_predict", "r2_score", "linear_probe", "ALPHAS"]

# ridge strengths, as multiples of the number of training samples (features are standardised)
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


def linear_probe(train_x, train_y, test_x, test_y, kind: str = "regression",
                 alphas=ALPHAS, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Fits a ridge probe on (train_x, train_y) and scores it on (test_x, test_y).

    kind="regression": targets [N] or [N,T] (e.g. cos/sin of an angle); score is R².
    kind="classification": integer labels [N]; score is accuracy, `chance` the accuracy of
    always guessing the most frequent training class.
    Returns {"score", "chance", "alpha" (the chosen strength, absolute), "kind", "n_train",
    "n_test"}."""
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
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
    n = train_x.shape[0]
    if n != len(fit_y) or test_x.shape[0] != len(test_y):
        raise ValueError("features and targets need the same number of rows in each split")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"need at least 3 training samples to pick the ridge strength, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    fit_idx, val_idx = order[n_val:], order[:n_val]
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
