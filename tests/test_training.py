"""Trainers: exact resume, checkpoint errors, NaN stop, metrics records, stage 2 freezing,
and DDP under torchrun (gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.training import (CheckpointError, TrainingDiverged, TrainLoop, load_checkpoint,
                                  train_stage1, train_stage2)
from selfboottok.training.losses import stage1_losses
from selfboottok.training.stages import merge_stage2

SMALL = {"encoder.width": 64, "encoder.depth": 1, "encoder.heads": 2,
         "decoder.width": 64, "decoder.depth": 1, "decoder.heads": 2,
         "bootstrap.width": 64, "bootstrap.depth": 1, "bootstrap.heads": 2,
         "generator.width": 64, "generator.depth": 1, "generator.heads": 2,
         "train.batch_size": 4, "train.log_every": 2, "train.sample_every": 3,
         "train.ckpt_every": 2, "train.warmup_steps": 2, "train.stage1_steps": 6,
         "train.stage2_steps": 4}


def small(**overrides):
    return SelfBootTokConfig.preset("tiny", **{**SMALL, **overrides})


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage1_resume_matches_uninterrupted_run(tmp_path):
    cfg = small()
    full = train_stage1(cfg, tmp_path / "full", dataset=data())
    train_stage1(cfg, tmp_path / "cut", dataset=data(), max_steps=3)
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == 3
    resumed = train_stage1(cfg, tmp_path / "cut", dataset=data(), resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    a, b = records(tmp_path / "full/metrics.jsonl"), records(tmp_path / "cut/metrics.jsonl")
    assert [r["step"] for r in a] == [2, 4, 6] and [r["step"] for r in b] == [2, 3, 4, 6]
    assert "rec" not in a[0] and "rec" in a[1]  # steps 1-3 are the global warm-up
    for key in ("loss", "rec", "rec_boot", "boot", "quant", "align", "lr"):
        assert abs(a[-1][key] - b[-1][key]) <= 1e-4 * max(1.0, abs(a[-1][key])), key
    out = tmp_path / "full"
    assert (out / "loss_curves.png").is_file() and (out / "model/model.safetensors").is_file()
    assert (out / "samples/stage1_step000006.png").is_file()


def test_max_steps_keeps_the_schedule(tmp_path):
    cfg = small()
    m = SelfBootTok(cfg)
    loop = TrainLoop(m, list(m.tokenizer.parameters()), lambda m, b: stage1_losses(m, b[0]), 6,
                     tmp_path, stage="stage1", max_steps=2)
    loop.run(data())
    assert loop.step == 2
    assert loop.sched.get_last_lr()[0] == pytest.approx(cfg.train.lr)  # warmup 2 of 6 steps


def test_each_part_is_clipped_on_its_own(tmp_path):
    """A part with huge gradients is clipped to grad_clip without scaling down the other part."""
    m = SelfBootTok(small(**{"train.lr": 0.0, "train.grad_clip": 100.0}))
    tok, boot = list(m.tokenizer.parameters()), list(m.bootstrap.parameters())

    def loss_fn(model, batch):  # only the tokenizer's gradients grow
        losses = stage1_losses(model, batch[0])
        return {**losses, "loss": losses["loss"] + 1e6 * losses["rec"]}

    def grads(params, out):
        TrainLoop(m, params, loss_fn, 1, out, stage="stage1").run(data(n=4))
        return [p.grad.clone() for p in tok], [p.grad.clone() for p in boot], records(out / "metrics.jsonl")[-1]

    def norm(gs):
        return torch.stack([g.norm() for g in gs]).norm().item()

    g_tok, g_boot, rec = grads({"tokenizer": tok, "bootstrap": boot}, tmp_path / "parts")
    assert norm(g_tok) == pytest.approx(100.0, rel=1e-4) and rec["grad_norm_tokenizer"] > 1e4
    assert norm(g_boot) == pytest.approx(rec["grad_norm_bootstrap"], rel=1e-4)  # left as computed
    assert 0 < norm(g_boot) < 100.0
    g_tok_all, g_boot_all, _ = grads(tok + boot, tmp_path / "one")  # one group: both scaled down
    assert norm(g_tok_all + g_boot_all) == pytest.approx(100.0, rel=1e-4)
    torch.testing.assert_close(g_boot_all, [g * 100.0 / rec["grad_norm"] for g in g_boot], rtol=1e-3, atol=0)


def test_checkpoint_errors(tmp_path):
    train_stage1(small(), tmp_path, dataset=data(), max_steps=2)
    ckpt = tmp_path / "checkpoints/last.pt"
    blob = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a selfboottok training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="different config"):
        train_stage1(small(seed=5), tmp_path, dataset=data(), resume=True)
    assert not list(tmp_path.glob("checkpoints/.*tmp*"))  # no temporary file left behind


def test_nan_loss_stops_cleanly(tmp_path):
    m = SelfBootTok(small())
    calls = []

    def loss_fn(model, batch):
        out = stage1_losses(model, batch[0])
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    loop = TrainLoop(m, list(m.tokenizer.parameters()), loss_fn, 6, tmp_path, stage="stage1")
    with pytest.raises(TrainingDiverged, match="at step 3"):
        loop.run(data())
    state = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert state["step"] == 2
    for v in state["model"].values():
        assert torch.isfinite(v.float()).all()


def test_named_groups_train_at_their_own_lr(tmp_path):
    m = SelfBootTok(small())
    tok, boot = list(m.tokenizer.parameters()), list(m.bootstrap.parameters())
    loop = TrainLoop(m, {"tokenizer": tok, "bootstrap": boot}, lambda m, b: stage1_losses(m, b[0]), 6,
                     tmp_path, stage="stage1", max_steps=2, lrs={"bootstrap": 3e-3})
    loop.run(data())  # step 2 of 6: the warmup is over, each group is at its peak
    lr_of = {id(p): g["lr"] for g in loop.opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(3e-3) for p in boot)
    assert all(lr_of[id(p)] == pytest.approx(m.config.train.lr) for p in tok)
    with pytest.raises(ValueError, match=r"lrs names groups \['generator'\]"):
        TrainLoop(m, {"tokenizer": tok}, lambda m, b: {}, 6, tmp_path, lrs={"generator": 1e-3})


def test_stage2_freezes_the_tokenizer_and_merges(tmp_path):
    cfg = small(**{"train.decoder_lr": 2e-3})
    s1 = train_stage1(cfg, tmp_path / "s1", dataset=data(), max_steps=2)
    enc = {k: v.clone() for k, v in s1.tokenizer.encoder.state_dict().items()}
    both = train_stage2(None, tmp_path / "s1/model", tmp_path / "s2", dataset=data(), max_steps=2)
    saved = SelfBootTok.from_pretrained(tmp_path / "s1/model")
    for k, v in both.tokenizer.encoder.state_dict().items():
        assert torch.equal(v, saved.tokenizer.encoder.state_dict()[k]), k
    assert set(enc) == set(both.tokenizer.encoder.state_dict())
    rec = records(tmp_path / "s2/metrics.jsonl")[-1]
    assert {"gen_maskgit", "gen_ar", "boot", "rec_boot"} <= set(rec)
    assert list((tmp_path / "s2/samples").glob("stage2_maskgit_step*.png"))
    # two jobs side by side, then merged
    g = train_stage2(None, tmp_path / "s1/model", tmp_path / "g", parts=["generator"], dataset=data(), max_steps=2)
    b = train_stage2(None, tmp_path / "s1/model", tmp_path / "b", parts=["bootstrap"], dataset=data(), max_steps=2)
    assert set(records(tmp_path / "g/metrics.jsonl")[-1]) >= {"gen_maskgit", "gen_ar"}
    assert "gen_ar" not in records(tmp_path / "b/metrics.jsonl")[-1]
    # the decoder job at train.decoder_lr, the generator job at train.lr (step 2: peak LR)
    assert records(tmp_path / "b/metrics.jsonl")[-1]["lr"] == pytest.approx(2e-3)
    assert records(tmp_path / "g/metrics.jsonl")[-1]["lr"] == pytest.approx(cfg.train.lr)
    # the generator job trains on ids tokenized once; the same job re-tokenizing every batch
    # takes the same steps
    cfg_nc = SelfBootTok.from_pretrained(tmp_path / "s1/model").config.with_overrides(**{"train.cache_tokens": False})
    g_nc = train_stage2(cfg_nc, tmp_path / "s1/model", tmp_path / "g_nc", parts=["generator"], dataset=data(), max_steps=2)
    for (name, a), b_ in zip(g.generators.state_dict().items(), g_nc.generators.state_dict().values()):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6, msg=name)
    merged = merge_stage2(tmp_path / "g/model", tmp_path / "b/model", tmp_path / "merged")
    for k, v in g.generators.state_dict().items():
        torch.testing.assert_close(merged.generators.state_dict()[k], SelfBootTok.from_pretrained(tmp_path / "g/model").generators.state_dict()[k])
    assert merged.generate([1], steps=2, seed=0).shape == (1, 3, 32, 32)


def test_torchrun_ddp_on_cpu(tmp_path):
    sets = [f"--set={k}={v}" for k, v in {**SMALL, "train.batch_size": 8}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfboottok.cli", "train", "stage1", "--preset", "tiny", *sets,
           "--samples", "64", "--max-steps", "2", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [2]
    assert (tmp_path / "model/model.safetensors").is_file()
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2


def test_training_progress_off_a_terminal_is_a_few_log_lines(tmp_path, capsys):
    """Redirected output (pytest's capture is no terminal): one line per 5% of the steps, no
    carriage-return redraws."""
    cfg = small(**{"train.log_every": 1, "train.sample_every": 10**6, "train.ckpt_every": 10**6})
    m = SelfBootTok(cfg)
    loop = TrainLoop(m, list(m.tokenizer.parameters()), lambda m, b: stage1_losses(m, b[0]), 40,
                     tmp_path, stage="stage1")
    loop.run(data(n=8))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stage1:")]
    assert "\r" not in err and len(lines) == 20, err
    assert lines[-1].startswith("stage1: 40/40 step (100%)") and "rec=" in lines[-1]


def test_tokenize_then_train_on_ids_matches_cached_tokens(tmp_path, capsys):
    """`selfboottok tokenize` then `train stage2 --ids` reaches the generator weights of the
    generator job that tokenizes the images itself (train.cache_tokens); the ids resume by
    shard and are refused for another tokenizer."""
    from selfboottok.cli import main
    from selfboottok.data import build_dataset
    from selfboottok.data.ids import IdsDataset, read_manifest

    train_stage1(small(), tmp_path / "s1", dataset=data(), max_steps=2)
    init, ids = tmp_path / "s1/model", tmp_path / "ids"
    tokenize = ["tokenize", "--model", str(init), "--data", "synthetic", "--samples", "24",
                "--shard-size", "10", "--batch-size", "7", "--device", "cpu", "--out", str(ids)]
    main(tokenize)
    m = read_manifest(ids)
    assert (m["n"], m["num_shards"], m["shard_size"], m["seq_len"], m["ids_dtype"]) == (24, 3, 10, 32, "uint16")
    assert m["source"]["data"] == "synthetic" and m["config"]["num_global"] == 32 and len(m["tokenizer"]) == 64
    main(["train", "stage2", "--init", str(init), "--ids", str(ids), "--max-steps", "2",
          "--out", str(tmp_path / "g_ids")])
    images = build_dataset("synthetic", 32, n=24, seed=0)
    cached = train_stage2(None, init, tmp_path / "g_img", parts=["generator"], dataset=images, max_steps=2)
    from_ids = SelfBootTok.from_pretrained(tmp_path / "g_ids/model")
    with_ema = SelfBootTok.from_pretrained(tmp_path / "g_img/model")
    for (name, a), b in zip(from_ids.generators.state_dict().items(), with_ema.generators.state_dict().values()):
        assert torch.equal(a, b), name
    assert records(tmp_path / "g_ids/metrics.jsonl")[-1]["gen_ar"] == records(tmp_path / "g_img/metrics.jsonl")[-1]["gen_ar"]
    stored = IdsDataset(ids, cached)
    assert torch.equal(torch.stack([stored[i][0] for i in range(24)]), cached.tokenize(torch.stack([images[i][0] for i in range(24)])).ids)

    # resume: finished shards are kept, the missing one is written again
    kept = (ids / "ids-00000.npy").stat().st_mtime_ns
    (ids / "ids-00001.npy").unlink()
    with pytest.raises(ValueError, match="ids-00001.npy cannot be read"):
        IdsDataset(ids)
    (ids / "manifest.json").write_text(json.dumps({**m, "complete": False}))  # as an interrupted run leaves it
    with pytest.raises(ValueError, match="unfinished"):
        IdsDataset(ids)
    capsys.readouterr()
    main(tokenize)
    assert "tokenize: 24/24 img (100%)" in capsys.readouterr().err
    assert (ids / "ids-00000.npy").stat().st_mtime_ns == kept and (ids / "ids-00001.npy").is_file()
    assert torch.equal(torch.stack([stored[i][0] for i in range(24)]), torch.stack([IdsDataset(ids)[i][0] for i in range(24)]))

    # another tokenizer: refused for training and for writing into the same folder
    SelfBootTok(small(seed=1)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another tokenizer"):
        train_stage2(None, tmp_path / "other", tmp_path / "g_other", parts=["generator"], ids=ids, max_steps=1)
    with pytest.raises(SystemExit):
        main([*tokenize[:2], str(tmp_path / "other"), *tokenize[3:]])
    assert "holds ids of another run (different tokenizer" in capsys.readouterr().err
