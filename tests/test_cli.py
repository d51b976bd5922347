"""The `selfboottok` command: help on every subcommand, and the demo end to end (then
reconstruct, generate and eval on its model)."""

import json
import subprocess
import sys

import pytest

from selfboottok.cli import build_parser

SUBCOMMANDS = ["demo", "train", "merge", "reconstruct", "generate", "eval", "ops", "bench"]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "selfboottok.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(([sub] if sub else []) + ["--help"])
    assert exc.value.code == 0
    assert "usage: selfboottok" in capsys.readouterr().out


def test_train_stage2_needs_init(tmp_path):
    res = run("train", "stage2", "--preset", "tiny", "--out", str(tmp_path))
    assert res.returncode != 0 and "--init" in res.stderr


def test_demo_writes_every_output_then_reconstruct_and_generate(tmp_path):
    out = tmp_path / "demo"
    res = run("demo", "--minutes", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("report.md", "metrics.json", "reconstructions.png", "generations_maskgit.png",
                 "generations_ar.png", "stage1/loss_curves.png", "stage2/generator/loss_curves.png",
                 "stage2/bootstrap/loss_curves.png", "stage1/metrics.jsonl",
                 "stage2/generator/metrics.jsonl", "stage2/bootstrap/metrics.jsonl",
                 "stage2/model/model.safetensors"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["psnr_full"] > 0 and m["psnr_bootstrap_only"] > 0
    assert set(m["class_nats_per_token"]) == {"maskgit", "ar"} and set(m["steps"]) == {"stage1", "generator", "bootstrap"}
    model = out / "stage2" / "model"
    res = run("generate", "--model", str(model), "--classes", "1", "3", "--n", "2", "--steps", "2",
              "--out", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "gen").glob("class*_*.png"))) == 4
    res = run("reconstruct", "--model", str(model), str(tmp_path / "gen" / "class1_000.png"),
              "--out", str(tmp_path / "rec"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "rec" / "reconstructions.png").is_file()
    res = run("reconstruct", "--model", str(model), str(tmp_path / "missing.png"), "--out", str(tmp_path))
    assert res.returncode != 0 and "missing.png" in res.stderr
    res = run("eval", "--model", str(model), "--what", "psnr", "rfid", "codebook", "--n", "6",
              "--samples", "12", "--batch-size", "3", "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n"] == 6 and m["extractor"] and m["data"] == "synthetic"
    for key in ("psnr", "psnr_boot", "ssim", "rfid", "rfid_boot", "codebook_usage"):
        assert m[key] is not None and m[key] == m[key], key
    assert "gfid" not in m
