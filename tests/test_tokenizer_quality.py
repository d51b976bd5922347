"""What the tokenizer-quality work added: the reconstruction losses, the conv output head, the
adversary (and its exact resume), the seam measure, the domain evaluator's cache and
determinism, the probes, and a fixed batch that the tokenizer must overfit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.config import LossConfig
from selfboottok.data import build_dataset
from selfboottok.eval.domain import DomainEvaluator, domain_evaluator
from selfboottok.eval.metrics import psnr, seam_ratio
from selfboottok.eval.probes import mlp_probe
from selfboottok.training import load_checkpoint, train_stage1, train_stage2
from selfboottok.training.losses import (focal_frequency_loss, hog_features, hog_loss, reconstruction_loss,
                                         stage1_losses)
from selfboottok.training.stages import stage1_parameters

TINY_EVALUATOR = {"n_train": 192, "n_test": 64, "epochs": 1, "batch_size": 32, "width": 4}


def images(gen, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


@pytest.mark.parametrize("term", ["l2", "l1", "ssim", "ffl", "hog"])
def test_each_reconstruction_term_is_zero_at_the_target_and_pulls_towards_it(gen, term):
    weights = {k: 0.0 for k in ("l2", "l1", "ssim", "ffl", "hog")}
    weights[term] = 1.0
    cfg = LossConfig(**weights)
    x = images(gen) * 0.9
    assert reconstruction_loss(x, x, cfg).item() == pytest.approx(0.0, abs=1e-5)
    rec = (x + 0.3 * torch.randn(x.shape, generator=gen)).requires_grad_(True)
    loss = reconstruction_loss(rec, x, cfg)
    assert loss.item() > 1e-3
    loss.backward()
    with torch.no_grad():  # a small step along the negative gradient lowers the loss
        closer = rec - 1e-2 * rec.grad / rec.grad.norm() * math.sqrt(rec.numel())
    assert reconstruction_loss(closer, x, cfg).item() < loss.item()


def test_focal_frequency_loss_by_hand(gen):
    x, y = images(gen, 1, 8), images(gen, 1, 8)
    d = torch.fft.fft2(x.double(), norm="ortho") - torch.fft.fft2(y.double(), norm="ortho")
    dist = d.abs() ** 2
    w = dist.sqrt() / dist.sqrt().max()
    assert focal_frequency_loss(x, y, alpha=1.0).item() == pytest.approx((w * dist).mean().item(), rel=1e-4)
    # alpha = 0: every frequency weighs 1, and by Parseval that is the pixel MSE
    assert focal_frequency_loss(x, y, alpha=0.0).item() == pytest.approx(F.mse_loss(x, y).item(), rel=1e-4)


def _hog_by_hand(img, cell, bins, eps, sharpness, offset=(0, 0)):
    """The same histograms without the Gaussian smoothing, pixel by pixel with atan2 (the test
    gives hog_features a sigma near 0, where its blur is the identity); the cells start at
    pixel `offset` and only whole ones are kept."""
    img = img.double().numpy()
    C, H, W = img.shape
    dy, dx = offset
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h = np.zeros((bins, (H - dy) // cell, (W - dx) // cell))
    for c in range(C):
        for i in range(dy, dy + h.shape[1] * cell):
            for j in range(dx, dx + h.shape[2] * cell):
                gx = (p[c, i + 1, j + 2] - p[c, i + 1, j]) / 2
                gy = (p[c, i + 2, j + 1] - p[c, i, j + 1]) / 2
                m, theta = math.hypot(gx, gy), math.atan2(gy, gx)
                for b in range(bins):
                    tune = max(0.0, math.cos(2 * (theta - b * math.pi / bins))) ** sharpness
                    h[b, (i - dy) // cell, (j - dx) // cell] += m * tune
    return h / np.sqrt((h**2).sum(0, keepdims=True) + eps**2)


def test_hog_features_by_hand_and_what_they_see(gen):
    x = images(gen, 1, 8)
    # sigma -> 0: the Gaussian becomes the identity, so the blur drops out of the comparison
    got = hog_features(x, cell=4, bins=6, sigma=1e-3, eps=0.5, sharpness=2)[0].double().numpy()
    np.testing.assert_allclose(got, _hog_by_hand(x[0], 4, 6, 0.5, 2), atol=2e-4)
    x = images(gen, 1, 12)
    got = hog_features(x, cell=4, bins=6, sigma=1e-3, eps=0.5, sharpness=2, offset=(3, 1))[0]
    assert got.shape == (6, 2, 2)
    np.testing.assert_allclose(got.double().numpy(), _hog_by_hand(x[0], 4, 6, 0.5, 2, (3, 1)), atol=2e-4)
    # a vertical edge votes for the horizontal gradient (bin 0), a horizontal one for bin bins/2
    v = torch.zeros(1, 3, 16, 16)
    v[..., 8:] = 1.0
    assert hog_features(v, bins=8)[0, :, :, 1:3].mean((1, 2)).argmax().item() == 0
    assert hog_features(v.transpose(2, 3), bins=8)[0, :, 1:3].mean((1, 2)).argmax().item() == 4
    # strong edges count by their shape, not their contrast; flat cells give 0
    strong = hog_features(v)[0, :, :, 1:3]
    assert torch.allclose(hog_features(0.8 * v)[0, :, :, 1:3], strong, atol=0.02)
    assert hog_features(v)[0, :, :, 0].abs().max() < 1e-3
    # the loss tells a mirrored shape from a blurred one
    shapes = build_dataset("synthetic", 32, n=16, seed=5, split="test").tensors()[0]
    blurred = F.avg_pool2d(F.pad(shapes, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert hog_loss(blurred, shapes) < 0.5 * hog_loss(shapes.flip(-1), shapes)
    with pytest.raises(ValueError, match="cell=4"):
        hog_features(torch.zeros(1, 3, 10, 10))
    with pytest.raises(ValueError, match="offset"):
        hog_features(torch.zeros(1, 3, 8, 8), offset=(0, 4))


def test_hog_jitter_draws_every_cell_offset(gen):
    x = images(gen, 2, 16)
    rec = x + 0.2 * torch.randn(x.shape, generator=gen)
    by_offset = {(dy, dx): (hog_features(rec, offset=(dy, dx)) - hog_features(x, offset=(dy, dx))).abs().mean()
                 for dy in range(4) for dx in range(4)}
    seen = set()
    for _ in range(200):
        value = hog_loss(rec, x, jitter=True)
        match = {k for k, v in by_offset.items() if torch.isclose(v, value, rtol=0, atol=1e-7)}
        assert match, "the jittered loss is the loss at one of the offsets"
        seen |= match
    assert len(seen) == 16
    assert hog_loss(x, x, jitter=True).item() == pytest.approx(0.0, abs=1e-6)


def test_hog_global_scale_weighs_only_the_global_paths_hog_term(gen):
    torch.manual_seed(0)
    m = SelfBootTok(_gan_config(**{"loss.gan": 0.0})).train()
    x = images(gen, 2)
    out = {}
    for scale in (1.0, 3.0):
        m.config.loss.hog_global_scale = scale
        torch.manual_seed(1)
        out[scale] = stage1_losses(m, x)
    with torch.no_grad():
        rec_boot = m.pixel_decoder(True)(m.tokenizer.encode(x).codes, *m.bootstrap(m.tokenizer.encode(x).codes))
    hog = hog_loss(rec_boot, x)
    torch.testing.assert_close(out[3.0]["rec"], out[1.0]["rec"])  # the full path is untouched
    torch.testing.assert_close(out[3.0]["rec_boot"] - out[1.0]["rec_boot"], 2 * hog, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="loss.hog_global_scale"):
        SelfBootTokConfig.preset("tiny", **{"loss.hog_global_scale": -1.0})


def test_conv_head_decodes_whole_images_and_its_gradients_flow(gen):
    m = SelfBootTok(SelfBootTokConfig.preset("tiny", decoder_head="conv", head_blocks=2)).train()
    x = images(gen)
    losses = stage1_losses(m, x)
    assert m.tokenizer.decoder.last_layer() is m.tokenizer.decoder.out.out[-1].weight
    losses["loss"].backward()
    for name, p in m.tokenizer.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.reconstruct(x).shape == x.shape


def test_seam_ratio_finds_patch_seams(gen):
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    f = torch.rand(2, 3, 2, 1, 1, generator=gen) * 0.3 + 0.1  # low frequencies, random phases
    phase = torch.rand(2, 3, 1, 1, generator=gen) * 6.3
    smooth = torch.sin(f[:, :, 0] * xx + phase) * torch.cos(f[:, :, 1] * yy + phase)
    assert seam_ratio(smooth, 4) == pytest.approx(1.0, abs=0.15)
    blocky = smooth + torch.randn(2, 3, 8, 8, generator=gen).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert seam_ratio(blocky, 4) > 3
    with pytest.raises(ValueError, match="patch"):
        seam_ratio(smooth, 5)


def _gan_config(**over):
    return SelfBootTokConfig.preset("tiny", **{
        "encoder.width": 64, "encoder.depth": 1, "encoder.heads": 2, "decoder.width": 64,
        "decoder.depth": 1, "decoder.heads": 2, "bootstrap.width": 64, "bootstrap.depth": 1,
        "bootstrap.heads": 2, "decoder_head": "conv", "loss.gan": 0.5, "loss.gan_start": 0.25,
        "loss.lecam": 0.01, "train.batch_size": 4, "train.log_every": 1, "train.ckpt_every": 2,
        "train.sample_every": 100, "train.warmup_steps": 2, **over})


def test_adversary_starts_late_trains_the_discriminator_and_resumes_exactly(tmp_path):
    data = build_dataset("synthetic", 32, n=32)
    cfg = _gan_config()
    full = train_stage1(cfg, tmp_path / "full", dataset=data, total_steps=8)
    train_stage1(cfg, tmp_path / "cut", dataset=data, total_steps=8, max_steps=4)
    resumed = train_stage1(cfg, tmp_path / "cut", dataset=data, total_steps=8, resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["extra"]["adversary"]
    b = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["extra"]["adversary"]
    assert a["step"] == b["step"] == 8
    for k in a["disc"]:
        torch.testing.assert_close(a["disc"][k], b["disc"][k], rtol=1e-5, atol=1e-6)
    import json
    records = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert "disc_loss" not in records[0] and "disc_loss" in records[-1]  # joins after 2 of 8 steps
    assert records[0]["gan"] == 0.0 and records[-1]["gan"] != 0.0


def test_gan_start_1_leaves_the_discriminator_to_stage_2(tmp_path):
    data = build_dataset("synthetic", 32, n=16)
    cfg = _gan_config(**{"loss.gan_start": 1.0})
    train_stage1(cfg, tmp_path / "s1", dataset=data, total_steps=2)
    assert "adversary" not in load_checkpoint(tmp_path / "s1/checkpoints/last.pt")["extra"]
    train_stage2(None, tmp_path / "s1/model", tmp_path / "s2", parts=["bootstrap"], dataset=data, total_steps=2)
    import json
    records = [json.loads(line) for line in (tmp_path / "s2/metrics.jsonl").read_text().splitlines()]
    assert records[0]["gan"] != 0.0 and "disc_loss" in records[0]  # a fresh one from step 1


def test_evaluator_is_cached_and_deterministic(tmp_path, one_thread):
    a = domain_evaluator("synthetic", 16, recipe=TINY_EVALUATOR, cache_dir=tmp_path / "a", progress=False)
    b = domain_evaluator("synthetic", 16, recipe=TINY_EVALUATOR, cache_dir=tmp_path / "b", progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name  # trained twice from scratch: the same weights
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    (tmp_path / "a" / files[1]).write_bytes((tmp_path / "b" / files[1]).read_bytes())
    cached = domain_evaluator("synthetic", 16, recipe=TINY_EVALUATOR, cache_dir=tmp_path / "a", progress=False)
    assert cached.report == a.report and set(cached.report["test_scores"]) >= {"label", "texture", "hue"}
    x = build_dataset("synthetic", 16, n=8, split="test").tensors()[0]
    torch.testing.assert_close(cached.features(x), a.features(x))
    other = domain_evaluator("synthetic", 16, recipe={**TINY_EVALUATOR, "seed": 1}, cache_dir=tmp_path / "a",
                             progress=False)  # another recipe: another cache entry
    assert len(list((tmp_path / "a").iterdir())) == 4 and not torch.equal(other.features(x), a.features(x))


def test_evaluator_scores_and_frechet_distance(gen):
    heads = {"label": ("class", 3), "hue": ("circ", 1.0), "size": ("reg", 1)}
    ev = DomainEvaluator(16, 3, heads, width=4, target_stats={"size": (0.5, 0.1)}).eval()
    x = images(gen, 40, 16)
    preds = ev.predict(x)
    assert preds["label"].shape == (40,) and ((preds["hue"] >= 0) & (preds["hue"] < 1)).all()
    scores = ev.score(x, {"label": preds["label"], "hue": preds["hue"], "size": preds["size"]})
    assert scores == pytest.approx({"label": 1.0, "hue": 1.0, "size": 1.0})
    assert ev.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    same_kind = ev.frechet_distance(x[:20], x[20:])
    assert ev.frechet_distance(x[:20], (x[20:] + 1).clamp(-1, 1)) > 3 * same_kind > 0
    with pytest.raises(ValueError, match="images must be"):
        ev.features(images(gen, 2, 32))


def test_mlp_probe_reads_a_nonlinear_factor_a_linear_one_cannot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)  # XOR of the signs
    from selfboottok.eval.probes import linear_probe

    lin = linear_probe(x[:400], y[:400], x[400:], y[400:], "classification")
    mlp = mlp_probe(x[:400], y[:400], x[400:], y[400:], "classification")
    assert lin["score"] < 0.7 and mlp["score"] > 0.9
    again = mlp_probe(x[:400], y[:400], x[400:], y[400:], "classification")
    assert again == mlp  # seeded


def test_tokenizer_overfits_a_fixed_batch(one_thread):
    """A change that stops the tokenizer from learning fails here: 8 real images, 60 steps of
    the default tiny tokenizer (both paths trained) at lr 1e-3 must reconstruct them above 18 dB
    on the full path, above the 17.6 dB of a flat image in each one's mean colour. Seeds 0-2
    reached 20.2-20.4 dB (18.7-18.8 with 8 local channels and no direct paths); runs that
    stalled (at lr 2e-3) sat at 16.7 dB."""
    torch.manual_seed(0)
    cfg = SelfBootTokConfig.preset("tiny")
    m = SelfBootTok(cfg).train()
    x = build_dataset("synthetic", 32, n=8).tensors()[0].clone()
    opt = torch.optim.AdamW(stage1_parameters(m), lr=1e-3)
    for _ in range(60):
        loss = stage1_losses(m, x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    full = psnr(m.reconstruct(x), x).mean().item()
    assert full > 18.0, full


def test_probe_samples_script_writes_one_score_per_model_and_size(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "model"
    SelfBootTok(SelfBootTokConfig.preset("tiny")).save_pretrained(folder)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "bench" / "probe_samples.py"), "--threads", "1", "--sizes", "20", "40",
           "--n-test", "30", "--models", f"a={folder}", f"b={folder}", "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(next((tmp_path / "out").glob("probe-samples-*.json")).read_text())
    assert set(data["scores"]) == {"a", "b"} and all(set(v) == {"20", "40"} for v in data["scores"].values())
    assert all(0 <= s["score"] <= 1 for v in data["scores"].values() for s in v.values())
    assert data["scores"]["a"] == data["scores"]["b"]  # the same model and data give the same probe
    bad = subprocess.run(cmd[:-5] + ["--models", "nolabel"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--models expects LABEL=DIR, got 'nolabel'" in bad.stderr


def test_gan_global_scale_weighs_only_the_global_paths_term(gen):
    from selfboottok.training.adversarial import Adversary
    from selfboottok.training.losses import stage2_losses

    x = images(gen, 2)
    terms, shown = {}, {}
    for scale in (0.0, 1.0, 2.0):
        cfg = _gan_config(**{"loss.gan_global_scale": scale})
        torch.manual_seed(0)
        m = SelfBootTok(cfg).train()
        adversary = Adversary(cfg, 0, "cpu")
        terms[scale] = stage2_losses(m, x, torch.zeros(2, dtype=torch.long), ("bootstrap",), adversary)["gan"]
        shown[scale] = sum(len(f) for _, f in adversary._seen)
    # the full path's term plus `scale` times the global path's, which is not 0
    assert torch.allclose(terms[2.0] - terms[1.0], terms[1.0] - terms[0.0], atol=1e-6)
    assert not torch.allclose(terms[1.0], terms[0.0])
    # at scale 0 the discriminator is not shown the global path's reconstructions
    assert shown == {0.0: 2, 1.0: 4, 2.0: 4}


def test_global_path_decoder_draws_only_the_global_path_and_starts_from_the_shared_one(gen, tmp_path):
    from selfboottok.training.losses import stage2_losses

    assert SelfBootTok(_gan_config(global_path_decoder=True, generator_tokens="all")).global_decoder is None
    m = SelfBootTok(_gan_config(global_path_decoder=True)).eval()
    x = images(gen, 2)
    t = m.tokenize(x)
    full, glob = m.decode(t.ids, t.local_1d, t.local_2d), m.decode(t.ids)
    with torch.no_grad():
        for p in m.global_decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    torch.testing.assert_close(m.decode(t.ids, t.local_1d, t.local_2d), full)
    assert not torch.allclose(m.decode(t.ids), glob, atol=1e-4)
    # stage-2 losses: the full path's reconstruction term reaches only the shared decoder, the
    # global path's only its own
    cfg = _gan_config(global_path_decoder=True, **{"loss.gan": 0.0})
    m = SelfBootTok(cfg).train()
    out = stage2_losses(m, x, torch.zeros(2, dtype=torch.long), ("bootstrap",))
    g_shared = torch.autograd.grad(out["rec"], list(m.tokenizer.decoder.parameters()), allow_unused=True)
    g_own = torch.autograd.grad(out["rec_boot"], list(m.global_decoder.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in g_shared + g_own)
    assert all(g is None for g in torch.autograd.grad(out["rec"], list(m.global_decoder.parameters()),
                                                       allow_unused=True, retain_graph=True))
    # stage 2 on a stage-1 model without one starts it from the shared decoder (lr 0: still equal)
    data = build_dataset("synthetic", 32, n=8)
    train_stage1(_gan_config(**{"loss.gan": 0.0}), tmp_path / "s1", dataset=data, total_steps=1)
    s2 = train_stage2(cfg.with_overrides(**{"train.decoder_lr": 0.0}), tmp_path / "s1/model", tmp_path / "s2",
                      parts=["bootstrap"], dataset=data, total_steps=1)
    s1 = SelfBootTok.from_pretrained(tmp_path / "s1/model")
    for (name, a), b in zip(s1.tokenizer.decoder.state_dict().items(), s2.global_decoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = SelfBootTok.from_pretrained(tmp_path / "s2/model")
    torch.testing.assert_close(loaded.decode(t.ids), s2.eval().decode(t.ids))
    # train.stage2_global_decoder: stage 2 adds it to a stage-1 model trained without it
    s1_cfg = _gan_config(**{"loss.gan": 0.0, "train.stage2_global_decoder": True})
    train_stage1(s1_cfg, tmp_path / "s1b", dataset=data, total_steps=1)
    assert SelfBootTok.from_pretrained(tmp_path / "s1b/model").global_decoder is None
    s2b = train_stage2(None, tmp_path / "s1b/model", tmp_path / "s2b", parts=["bootstrap"], dataset=data,
                       total_steps=1)
    assert s2b.config.global_path_decoder and s2b.global_decoder is not None
    assert SelfBootTok.from_pretrained(tmp_path / "s2b/model").global_decoder is not None
