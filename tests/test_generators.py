"""The generators' options: how the class conditions the transformer (generator_cond), the
MaskGIT training mask floor, the guidance schedule and the choice temperature. Shapes, KV-cache
decoding against the uncached forward, guidance weights, checkpoints of another conditioning
failing to load, bad settings, and a tiny overfit in which the class decides the sample."""

import math

import pytest
import torch

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.models import build_generator
from selfboottok.models import generator as G
from selfboottok.models.layers import KVCache

CONDS = G.CONDITIONINGS
KINDS = ("maskgit", "ar")


def tiny(**overrides):
    return SelfBootTokConfig.preset("tiny", **overrides)


def small(**overrides):
    """A generator config small enough to train in a test."""
    width = {"generator.width": 32, "generator.depth": 2, "generator.heads": 2}
    return tiny(**{**width, **overrides})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_losses_and_samples(kind, cond, gen):
    c = small(generator_cond=cond)
    g = build_generator(kind, c)
    assert g.cond == cond
    B, T, V = 3, c.num_quantized, c.vocab_size
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.randint(0, c.num_classes, (B,), generator=gen)
    logits = g(ids if kind == "maskgit" else ids[:, :-1], labels)
    assert logits.shape == (B, T, V)
    loss = g.loss(ids, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    # every parameter takes part (adaLN-zero: the block weights only after the gates move)
    unused = [n for n, p in g.named_parameters() if p.grad is None]
    assert not unused, unused
    g.eval()
    for schedule in G.GUIDANCE_SCHEDULES:
        out = g.generate(labels, guidance=2.0, guidance_schedule=schedule,
                         generator=torch.Generator().manual_seed(0))
        assert out.shape == (B, T) and out.dtype == torch.long
        assert 0 <= out.min() and out.max() < V


@pytest.mark.parametrize("cond", CONDS)
def test_pipeline_generate_with_each_conditioning(cond):
    m = SelfBootTok(small(generator_cond=cond, guidance_schedule="linear")).eval()
    for kind in KINDS:
        a = m.generate([0, 7], steps=3, guidance=3.0, generator=kind, seed=1, temperature=0.8,
                       top_k=20 if kind == "ar" else None)
        assert a.shape == (2, 3, 32, 32) and a.abs().max() <= 1
        assert torch.equal(a, m.generate([0, 7], steps=3, guidance=3.0, generator=kind, seed=1,
                                         temperature=0.8, top_k=20 if kind == "ar" else None))


def test_pipeline_generate_forwards_sampling_options():
    m = SelfBootTok(small()).eval()
    torch.manual_seed(0)
    for p in m.generators.parameters():  # random weights: at init (zero heads) guidance changes nothing
        p.data.normal_(0, 0.2)
    for kind in KINDS:
        base = m.generate([0, 7], steps=3, guidance=3.0, generator=kind, seed=1)
        same = m.generate([0, 7], steps=3, guidance=3.0, generator=kind, seed=1, guidance_schedule="constant")
        linear = m.generate([0, 7], steps=3, guidance=3.0, generator=kind, seed=1, guidance_schedule="linear")
        assert torch.equal(base, same) and not torch.equal(base, linear)  # the option reaches the sampler
        with pytest.raises(ValueError, match="guidance_schedule"):
            m.generate([0, 7], steps=3, guidance=3.0, generator=kind, guidance_schedule="cubic")
    with pytest.raises(ValueError, match="maskgit_choice_temperature"):
        m.generate([0], steps=2, generator="maskgit", choice_temperature=-1.0)


@pytest.mark.parametrize("cond", CONDS)
def test_ar_kv_cache_decoding_equals_the_uncached_forward(cond, gen):
    """In float64: the cached forward (one or two new positions a step) gives the full causal
    forward's logits, and greedy sampling under both guidance schedules picks what greedy
    decoding with the uncached forward picks."""
    c = small(generator_cond=cond, generators=["ar"])
    ar = build_generator("ar", c).double().eval()
    with torch.no_grad():  # move the adaLN-zero gates off zero, or every block is the identity
        for p in ar.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    B, T = 3, c.num_quantized
    ids = torch.randint(0, c.vocab_size, (B, T), generator=gen)
    labels = torch.randint(0, c.num_classes, (B,), generator=gen)
    with torch.no_grad():
        full = ar(ids[:, :-1], labels)
        emb = ar.embed(ids[:, :-1], labels)
        torch.testing.assert_close(emb[:, 1:], ar.embed_next(ids[:, :-1], labels, 1), rtol=0, atol=0)
        for step in (1, 2):
            cache = KVCache(T)
            cached = torch.cat([ar.body(emb[:, t:t + step], labels, causal=True, cache=cache)
                                for t in range(0, T, step)], 1)
            torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-10)
        for guidance, schedule in ((0.0, "constant"), (3.0, "constant"), (3.0, "linear")):
            sampled = ar.generate(labels, guidance=guidance, temperature=0, guidance_schedule=schedule)
            prefix = ids[:, :0]
            for t in range(T):
                w = G.guidance_at(guidance, schedule, (t + 1) / T)
                prefix = torch.cat([prefix, ar.guided(prefix, labels, w)[:, -1].argmax(-1, keepdim=True)], 1)
            assert torch.equal(sampled, prefix), (guidance, schedule)


def test_guided_logits_and_the_guidance_schedules(gen):
    c = small(generators=["maskgit"])
    g = build_generator("maskgit", c).eval()
    ids = torch.full((2, c.num_quantized), g.mask_id)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        cond, uncond = g(ids, labels), g(ids, g.null(labels))
        torch.testing.assert_close(g.guided(ids, labels, 2.5), cond + 2.5 * (cond - uncond))
        assert torch.equal(g.guided(ids, labels, 0.0), cond)
    assert G.guidance_at(4.0, "constant", 0.25) == 4.0
    assert G.guidance_at(4.0, "linear", 0.25) == 1.0 and G.guidance_at(4.0, "linear", 1.0) == 4.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", G.GUIDANCE_SCHEDULES)
def test_generate_uses_the_scheduled_guidance(kind, schedule, monkeypatch):
    """The weights each round or position is guided with: constant, or the guidance times the
    fraction of tokens fixed by the end of the round (MaskGIT: the cosine schedule's count)."""
    c = small(generators=[kind], guidance_schedule=schedule)
    g = build_generator(kind, c).eval()
    seen = []
    real_cfg = G._cfg

    def spy(cond, uncond, w):
        seen.append(w)
        return real_cfg(cond, uncond, w)

    monkeypatch.setattr(G, "_cfg", spy)
    T, steps = c.num_quantized, 5
    if kind == "maskgit":
        g.generate(torch.tensor([2, 3]), steps=steps, guidance=6.0)
        left = [math.floor(T * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps - 1)] + [0]
        done = [1 - n / T for n in left]
    else:
        g.generate(torch.tensor([2, 3]), guidance=6.0)
        done = [(t + 1) / T for t in range(T)]
    want = [6.0 if schedule == "constant" else 6.0 * d for d in done]
    assert seen == pytest.approx(want)
    seen.clear()  # the keyword overrides the config's default
    other = "linear" if schedule == "constant" else "constant"
    if kind == "maskgit":
        g.generate(torch.tensor([2]), steps=steps, guidance=6.0, guidance_schedule=other)
    else:
        g.generate(torch.tensor([2]), guidance=6.0, guidance_schedule=other)
    assert seen != pytest.approx(want)


def test_class_dropout_replaces_labels_with_the_null_class_in_training_only():
    g = build_generator("ar", small(class_dropout=0.3))
    labels = torch.randint(0, 10, (20000,))
    torch.manual_seed(0)
    dropped = (g.train().drop_labels(labels) == 10).float().mean().item()
    assert abs(dropped - 0.3) < 0.02
    assert torch.equal(g.eval().drop_labels(labels), labels)
    assert torch.equal(build_generator("ar", small(class_dropout=0.0)).train().drop_labels(labels), labels)


@pytest.mark.parametrize("min_mask", [0.0, 0.5, 1.0])
def test_maskgit_training_masks_at_least_min_mask(min_mask, monkeypatch):
    g = build_generator("maskgit", small(maskgit_min_mask=min_mask, generators=["maskgit"]))
    T = g.seq_len
    fractions = []
    real_forward = type(g).forward

    def spy(self, ids, labels):
        fractions.extend(((ids == self.mask_id).sum(-1).float() / T).tolist())
        return real_forward(self, ids, labels)

    monkeypatch.setattr(type(g), "forward", spy)
    torch.manual_seed(0)
    g.loss(torch.randint(0, g.vocab, (4000, T)), torch.randint(0, 10, (4000,)))
    assert min(fractions) >= min_mask - 1e-6 and max(fractions) == 1.0
    if min_mask < 1:
        assert min(fractions) < min_mask + 2 / T  # reaches down to its floor
        # the cosine schedule: mean ratio of r ~ U(0, r_max) is sin(pi r_max / 2) / (pi r_max / 2)
        r_max = 2 / math.pi * math.acos(min_mask)
        assert sum(fractions) / len(fractions) == pytest.approx(
            math.sin(math.pi * r_max / 2) / (math.pi * r_max / 2), abs=1.5 / T)


def test_choice_temperature_defaults_to_the_sampling_temperature():
    labels = torch.tensor([1, 5, 9])

    def sample(g, **kw):
        return g.generate(labels, steps=4, temperature=0.7, generator=torch.Generator().manual_seed(3), **kw)

    g = build_generator("maskgit", small(generators=["maskgit"])).eval()
    assert g.choice_temperature is None
    assert torch.equal(sample(g), sample(g, choice_temperature=0.7))
    assert not torch.equal(sample(g), sample(g, choice_temperature=50.0))
    h = build_generator("maskgit", small(generators=["maskgit"], maskgit_choice_temperature=50.0)).eval()
    h.load_state_dict(g.state_dict())
    assert torch.equal(sample(h), sample(g, choice_temperature=50.0))  # the config's default


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_of_another_conditioning_fail_to_load(kind):
    """A model saved under one conditioning does not load silently into another."""
    states = {cond: build_generator(kind, small(generator_cond=cond)).state_dict() for cond in CONDS}
    for cond in CONDS:
        for other in CONDS:
            target = build_generator(kind, small(generator_cond=cond))
            if cond == other:
                target.load_state_dict(states[other])
            else:
                with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
                    target.load_state_dict(states[other])


def test_config_round_trip_and_bad_settings(tmp_path):
    c = tiny(generator_cond="adaln", maskgit_min_mask=0.4, guidance_schedule="linear",
             maskgit_choice_temperature=2.0)
    c.save(tmp_path / "c.yaml")
    assert SelfBootTokConfig.load(tmp_path / "c.yaml") == c
    assert SelfBootTokConfig.from_dict(tiny().to_dict()).maskgit_choice_temperature is None
    bad = [({"generator_cond": "film"}, "generator_cond must be one of"),
           ({"guidance_schedule": "cosine"}, "guidance_schedule must be one of"),
           ({"maskgit_min_mask": 1.5}, r"maskgit_min_mask must be in \[0, 1\]"),
           ({"maskgit_choice_temperature": -1.0}, "maskgit_choice_temperature must be None or >= 0"),
           ({"class_dropout": 1.0}, r"class_dropout must be in \[0, 1\)")]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            SelfBootTok(small(**overrides))
    g = build_generator("ar", small()).eval()
    with pytest.raises(ValueError, match="guidance_schedule must be one of"):
        g.generate(torch.tensor([0]), guidance=1.0, guidance_schedule="cosine")
    with pytest.raises(ValueError, match="generator kind must be 'maskgit' or 'ar'"):
        build_generator("diffusion", small())


@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_overfit_draws_the_class(kind, cond):
    """Four classes, each one fixed id sequence: after a short training greedy samples of each
    class are its sequence (with and without guidance), so the class decides the sample."""
    torch.manual_seed(0)
    c = small(generator_cond=cond, num_classes=4, class_dropout=0.1, generators=[kind],
              maskgit_min_mask=0.3)
    g = build_generator(kind, c)
    T, V = c.num_quantized, c.vocab_size
    targets = torch.randint(0, V, (4, T))
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3)
    labels = torch.arange(4).repeat(8)
    for _ in range(300):
        opt.zero_grad()
        g.loss(targets[labels], labels).backward()
        opt.step()
    g.eval()
    classes = torch.tensor([3, 0, 2, 1])
    for guidance in (0.0, 2.0):
        if kind == "maskgit":
            out = g.generate(classes, steps=4, guidance=guidance, temperature=0)
        else:
            out = g.generate(classes, guidance=guidance, temperature=0)
        assert torch.equal(out, targets[classes]), (guidance, (out == targets[classes]).float().mean())
