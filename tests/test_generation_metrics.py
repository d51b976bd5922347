"""Generation metrics (selfboottok/eval/generation.py) on known cases: precision/recall of a set
against itself and against a far-away set, class accuracy of a perfect and of a constant
generator, domain FD of a set against itself and shifted copies, the guidance sweep, and
evaluate_model's domain metrics for both generators in both modes."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.data import build_dataset
from selfboottok.eval.domain import domain_evaluator, train_domain_evaluator
from selfboottok.eval.evaluate import evaluate_model, real_features
from selfboottok.eval.generation import (balanced_labels, class_accuracy, class_information, generation_metrics,
                                         guidance_sweep, precision_recall, sample_batches,
                                         sample_features)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = {"n_train": 256, "n_test": 64, "epochs": 1, "width": 8}
C = 10
# one colour per class: a task any evaluator learns exactly
PALETTE = torch.tensor([[r, g, b] for r in (-0.8, 0.0, 0.8) for g in (-0.8, 0.0, 0.8)
                        for b in (-0.8, 0.8)][:C])


def colour_images(labels, seed=0):
    noise = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (PALETTE[labels][:, :, None, None] + 0.05 * noise).clamp(-1, 1)


class ColourSet(torch.utils.data.Dataset):
    num_classes = C

    def __init__(self, n, seed):
        self.labels = balanced_labels(n, C)
        self.images = colour_images(self.labels, seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class ColourGenerator:
    """Draws the class colour of each label (`perfect`), or always class 0's."""

    def __init__(self, perfect):
        self.perfect, self.config, self.calls = perfect, SimpleNamespace(num_classes=C), []

    def generate(self, labels, steps, guidance, generator, seed, temperature):
        self.calls.append((list(labels), seed))
        labels = torch.as_tensor(labels) if self.perfect else torch.zeros(len(labels), dtype=torch.long)
        return colour_images(labels, seed)


@pytest.fixture(scope="module")
def colour_evaluator():
    recipe = {"epochs": 4, "batch_size": 32, "width": 8, "lr": 5e-3}
    ev = train_domain_evaluator(ColourSet(320, 0), ColourSet(100, 1), recipe, progress=False)
    assert ev.report["test_scores"]["label"] == 1.0  # the premise of the known cases below
    return ev


@pytest.fixture(scope="module")
def synthetic_evaluator(tmp_path_factory):
    return domain_evaluator("synthetic", 32, recipe=TINY_RECIPE, cache_dir=tmp_path_factory.mktemp("domain"),
                            progress=False)


# ---------------------------------------------------------------------------------------------
# precision and recall

def test_precision_recall_of_a_set_with_itself_and_a_far_away_set():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8))
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    far = rng.standard_normal((150, 8)) + 100.0
    assert precision_recall(real, far, k=5) == {"precision": 0.0, "recall": 0.0}
    # half of the fakes on the real samples, half far away: precision 1/2; recall 1 (each real
    # sample is a fake one)
    half = np.concatenate([real[:100], far[:100]])
    both = precision_recall(real[:100], half)
    assert both == {"precision": 0.5, "recall": 1.0}


def test_precision_recall_by_hand():
    # k=1 radii: real {0,1,2,10} -> 1,1,1,8; fake {0.5,5,20} -> 4.5,4.5,15
    real, fake = np.array([[0.0], [1.0], [2.0], [10.0]]), np.array([[0.5], [5.0], [20.0]])
    r = precision_recall(torch.from_numpy(real), fake, k=1, chunk=2)
    assert r["precision"] == pytest.approx(2 / 3)  # 20 lies outside every real ball
    assert r["recall"] == 1.0  # 10 is within 15 of 20
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real, fake, k=3)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(real, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="fake must be"):
        precision_recall(real, np.zeros(5))


# ---------------------------------------------------------------------------------------------
# class accuracy

def test_class_accuracy_overall_and_per_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    r = class_accuracy([0, 1, 1, 1, 0, 0], labels, num_classes=4)
    assert r["class_acc"] == pytest.approx(0.5)
    assert r["class_acc_per_class"] == [0.5, 1.0, 0.0, None]  # class 3 has no samples
    with pytest.raises(ValueError, match="one length"):
        class_accuracy([0, 1], labels, 3)


def test_class_accuracy_of_a_perfect_and_a_constant_generator(colour_evaluator):
    real = real_features(ColourSet(60, 2), evaluator=colour_evaluator, progress=False)["domain"]
    for perfect, want in ((True, 1.0), (False, 1 / C)):
        gen = ColourGenerator(perfect)
        s = sample_features(gen, 40, evaluator=colour_evaluator, batch_size=16, seed=7, progress=False)
        r = generation_metrics(s, real, C, what=("class_acc",))
        assert r["class_acc"] == pytest.approx(want), perfect
        assert r["class_acc_per_class"] == ([1.0] * C if perfect else [1.0] + [0.0] * (C - 1))
    # batches of 16, seeded seed + b, labels balanced
    assert [seed for _, seed in gen.calls] == [7, 8, 9]
    assert sum((labels for labels, _ in gen.calls), []) == balanced_labels(40, C).tolist()


class _LabelLoss(torch.nn.Module):
    """A 'generator' whose loss is `base` plus `cost` times the share of rows whose label is not
    the true one, with a random term that only the same seed repeats."""

    def __init__(self, truth, cost):
        super().__init__()
        self.truth, self.cost = truth, cost

    def loss(self, ids, labels):
        return 2.0 + torch.rand(()) + self.cost * (labels != self.truth).double().mean()


def test_class_information_of_a_generator_that_uses_and_one_that_ignores_the_class():
    labels = torch.tensor([0, 1, 2, 2])
    ids = torch.zeros(4, 5, dtype=torch.long)
    model = SimpleNamespace(config=SimpleNamespace(num_classes=3),
                            generators=torch.nn.ModuleDict({"uses": _LabelLoss(labels, 0.7),
                                                            "ignores": _LabelLoss(labels, 0.0)}))
    info = class_information(model, ids, labels, repeats=3)
    assert info["uses"]["class_nats"] == pytest.approx(0.7)  # every wrong label costs 0.7
    assert info["ignores"]["class_nats"] == pytest.approx(0.0, abs=1e-12)  # same masks both ways
    assert 2.0 <= info["uses"]["test_nll"] <= 3.0
    with pytest.raises(ValueError, match="one label per row"):
        class_information(model, ids, labels[:3])


def test_sample_batches_checks_its_settings():
    gen = ColourGenerator(True)
    with pytest.raises(ValueError, match="batch_size"):
        next(sample_batches(gen, [0, 1], batch_size=0))
    with pytest.raises(ValueError, match="temperature"):
        next(sample_batches(gen, [0, 1], temperature=-1))
    labels, images, seconds = next(sample_batches(gen, [3, 4, 5], batch_size=2, progress=False))
    assert labels.tolist() == [3, 4] and images.shape == (2, 3, 16, 16) and seconds >= 0


# ---------------------------------------------------------------------------------------------
# domain FD

def test_domain_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift(synthetic_evaluator):
    images = build_dataset("synthetic", 32, n=64, split="test").tensors()[0]
    real = synthetic_evaluator.features(images)
    fds = []
    for shift in (0.0, 0.3, 1.0):
        fake = {"domain": synthetic_evaluator.features((images + shift).clamp(-1, 1)),
                "labels": None, "predicted": None}
        fds.append(generation_metrics(fake, real, C, what=("domain_fd",))["domain_fd"])
    assert abs(fds[0]) < 1e-9 * max(fds[1:])
    assert 0 < fds[1] < fds[2], fds
    # in feature space: a shift by d adds |d|^2
    d = torch.full((real.shape[1],), 0.01, dtype=torch.float64)
    moved = generation_metrics({"domain": real + d}, real, C, what=("domain_fd",))["domain_fd"]
    assert moved == pytest.approx(float(d @ d), rel=1e-6)
    with pytest.raises(ValueError, match="no domain features"):
        generation_metrics({"domain": None}, real, C)


# ---------------------------------------------------------------------------------------------
# the guidance sweep, and the metrics of real generators

@pytest.fixture(scope="module")
def synthetic_real(synthetic_evaluator):
    ds = build_dataset("synthetic", 32, n=24, split="test")
    return ds, real_features(ds, evaluator=synthetic_evaluator, progress=False)["domain"]


def test_guidance_sweep_writes_its_plot_and_one_row_per_value(tmp_path, synthetic_evaluator, synthetic_real):
    model = SelfBootTok(SelfBootTokConfig.preset("tiny")).train()
    path = tmp_path / "sweep" / "guidance.png"
    rows = guidance_sweep(model, synthetic_evaluator, synthetic_real[1], [0, 1.5, 4], n=10, steps=2,
                          batch_size=10, path=path, progress=False, generator="ar", temperature=0.8)
    assert [r["guidance"] for r in rows] == [0.0, 1.5, 4.0]
    for r in rows:
        assert 0 <= r["class_acc"] <= 1 and r["domain_fd"] >= 0 and 0 <= r["recall"] <= 1
        assert len(r["class_acc_per_class"]) == C and r["prec_recall_k"] == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training  # its mode is restored
    with pytest.raises(ValueError, match="guidances"):
        guidance_sweep(model, synthetic_evaluator, synthetic_real[1], [], n=10)
    with pytest.raises(ValueError, match="sets the guidance itself"):
        guidance_sweep(model, synthetic_evaluator, synthetic_real[1], [1], n=10, guidance=2)


@pytest.mark.parametrize("mode", ["global", "all"])
@pytest.mark.parametrize("generator", ["maskgit", "ar"])
def test_evaluate_model_domain_metrics_for_each_generator_and_mode(mode, generator, synthetic_evaluator,
                                                                    synthetic_real):
    ds, real = synthetic_real
    model = SelfBootTok(SelfBootTokConfig.preset("tiny", generator_tokens=mode)).eval()
    kw = dict(what=("class_acc", "domain_fd", "prec_recall"), n=24, evaluator=synthetic_evaluator,
              generator=generator, steps=2, guidance=2.0, temperature=0.9, batch_size=8, seed=3,
              progress=False)
    r = evaluate_model(model, ds, **kw)
    assert r["n_ref"] == 24 and r["n_generated"] == 24 and r["mode"] == ("selfboottok" if mode == "global" else "baseline")
    assert 0 <= r["class_acc"] <= 1 and math.isfinite(r["domain_fd"]) and r["domain_fd"] >= 0
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["evaluator"] == synthetic_evaluator.report
    # the same samples judged by hand: the evaluator's predictions and features of the images
    images = torch.cat([model.generate(lab.tolist(), steps=2, guidance=2.0, generator=generator, seed=3 + b,
                                       temperature=0.9) for b, lab in enumerate(balanced_labels(24, C).split(8))])
    want = synthetic_evaluator.class_accuracy(images, balanced_labels(24, C).numpy())
    assert r["class_acc"] == pytest.approx(want)
    # precomputed real features (no dataset needed) give the same numbers; n_gen apart from n_ref
    again = evaluate_model(model, None, real={"domain": real}, **kw)
    for key in ("class_acc", "domain_fd", "precision", "recall"):
        assert again[key] == pytest.approx(r[key], rel=1e-9), key
    fewer = evaluate_model(model, None, real={"domain": real[:10]}, n_gen=12, **kw)
    assert fewer["n_ref"] == 10 and fewer["n_generated"] == 12 and fewer["n"] == 0
