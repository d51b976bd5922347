"""Fréchet distance between Gaussians fitted to features (FID), and the feature statistics in
the `.npz` layout of pytorch-fid and the ADM evaluation suite (arrays `mu` and `sigma`)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["frechet_distance", "feature_stats", "save_stats", "load_stats", "fid_from_features"]


def _f64(x, name) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array or tensor: {exc}") from exc
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import scipy.linalg  # only this path needs scipy

    out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out  # older scipy with disp=False returns a pair


def _trace_sqrt_product_eigh(sigma1, sigma2) -> float:
    # tr((s1 s2)^(1/2)) = sum of sqrt eigenvalues of the symmetric s1^(1/2) s2 s1^(1/2)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ sigma2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    Inputs may be numpy arrays or torch tensors. `method="sqrtm"` (the usual FID code path):
    scipy's matrix square root of the product; if it is not finite (a singular product), `eps`
    is added to both diagonals and the root taken again; a complex root whose diagonal has an
    imaginary part above 1e-3 raises, a smaller one is dropped. `method="eigh"`: the same trace
    from two symmetric eigendecompositions, exact for positive semidefinite covariances and
    several times faster at 2048 dimensions."""
    mu1, mu2 = _f64(mu1, "mu1").reshape(-1), _f64(mu2, "mu2").reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_f64(sigma1, "sigma1")), np.atleast_2d(_f64(sigma2, "sigma2"))
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu1 and mu2 must have the same length, got {d} and {mu2.shape[0]}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d},{d}] to match the means, got {list(s.shape)}")
    if method == "eigh":
        tr_root = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        root = _sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(d) * eps
            root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(root):
            worst = np.abs(np.diagonal(root).imag).max()
            if worst > 1e-3:
                raise ValueError(f"the covariance product has a complex square root (imaginary part "
                                 f"{worst:.3g} on the diagonal); the statistics are not valid covariances")
            root = root.real
        tr_root = float(np.trace(root))
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_root)


def feature_stats(features):
    """Mean [D] and unbiased covariance [D,D] (float64 numpy) of [N,D] features, N >= 2."""
    f = _f64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N,D] with N >= 2, got {list(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


def save_stats(path, mu, sigma) -> Path:
    """Writes `mu` and `sigma` to a `.npz` file (pytorch-fid / ADM layout)."""
    mu, sigma = _f64(mu, "mu").reshape(-1), _f64(sigma, "sigma")
    if sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"sigma must be [{mu.shape[0]},{mu.shape[0]}], got {list(sigma.shape)}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")  # np.savez would append it anyway
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    tmp.replace(path)
    return path


def load_stats(path):
    """(mu, sigma) from a `.npz` file with arrays `mu` and `sigma`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz file with 'mu' and 'sigma'")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks array(s) {missing}; it has {data.files}")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def fid_from_features(features1, features2, method: str = "auto") -> float:
    """FID between two [N,D] feature sets.

    With fewer samples than dimensions (`method="auto"` when min(N1,N2) < D, or "gram") the
    covariances are low rank and the trace term is computed exactly from the samples:
    tr((S1 S2)^(1/2)) is the nuclear norm of A B^T / sqrt((N1-1)(N2-1)), A and B the centred
    features (an N1 x N2 SVD instead of a D x D matrix root). Otherwise ("auto" with enough
    samples, "sqrtm" or "eigh") it is `frechet_distance` of the two `feature_stats`."""
    if method not in ("auto", "gram", "sqrtm", "eigh"):
        raise ValueError(f"method must be 'auto', 'gram', 'sqrtm' or 'eigh', got {method!r}")
    a, b = _f64(features1, "features1"), _f64(features2, "features2")
    for name, f in (("features1", a), ("features2", b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be [N,D] with N >= 2, got {list(f.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if method == "auto":
        method = "gram" if min(a.shape[0], b.shape[0]) < a.shape[1] else "sqrtm"
    if method != "gram":
        return frechet_distance(*feature_stats(a), *feature_stats(b), method=method)
    mu1, mu2 = a.mean(0), b.mean(0)
    ac, bc = a - mu1, b - mu2
    n1, n2 = a.shape[0] - 1, b.shape[0] - 1
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (ac * ac).sum() / n1 + (bc * bc).sum() / n2
                 - 2 * nuclear / np.sqrt(n1 * n2))
