"""SelfBootTok models and pipeline: shapes, gradients, the ids-only decode path, the two
generator modes, OT alignment against POT, save/load, determinism, FLOPs and bad inputs."""

from pathlib import Path

import pytest
import torch

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.eval.flops import count_flops, generator_flops
from selfboottok.models import Alignment, build_generator, cosine_cost
from selfboottok.training.losses import stage1_losses, stage2_losses
from selfboottok.training.stages import stage2_parameters, update_teacher


def tiny(**overrides):
    return SelfBootTokConfig.preset("tiny", **overrides)


@pytest.fixture(scope="module")
def model():
    return SelfBootTok(tiny()).eval()


def images(gen, n=3, size=32):
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def test_public_methods_shapes_and_ranges(model, gen):
    c = model.config
    x = images(gen)
    t = model.tokenize(x)
    assert t.global_ids.shape == (3, c.num_global) and t.global_ids.dtype == torch.long
    assert 0 <= t.global_ids.min() and t.global_ids.max() < c.vocab_size
    assert t.local_1d.shape == (3, c.num_local, c.local_dim)
    assert t.local_2d.shape == (3, c.num_patches, c.local_2d_dim)
    assert torch.equal(t.ids, t.global_ids)
    outs = [model.decode(t.global_ids), model.decode(t.global_ids, t.local_1d, t.local_2d),
            model.reconstruct(x), model.reconstruct(x, bootstrap=True),
            model.generate([0, 3, 9], steps=3, guidance=1.0, seed=1),
            model.generate([1, 2], generator="ar", guidance=2.0, seed=1, top_k=20, top_p=0.9)]
    for img in outs:
        assert img.shape[1:] == (3, 32, 32) and torch.isfinite(img).all()
        assert img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(outs[1], outs[2])


def test_b64_on_meta():
    c = SelfBootTokConfig.preset("b64")
    with torch.device("meta"):
        m = SelfBootTok(c)
        x = torch.empty(2, 3, 256, 256)
        t = m.tokenize(x)
        assert t.global_ids.shape == (2, 64) and t.local_1d.shape == (2, 48, 16)
        assert t.local_2d.shape == (2, 256, 8)
        assert m.decode(t.global_ids).shape == (2, 3, 256, 256)
        assert stage1_losses(m, x)["loss"].shape == ()
    enc = sum(p.numel() for p in m.tokenizer.encoder.parameters())
    assert 80e6 < enc < 90e6  # ViT-B, as TiTok-B-64's encoder


@pytest.mark.parametrize("overrides", [{}, {"quantizer": "fsq"}, {"alignment": "softmax"}, {"query_init": "learned"},
                                       {"alignment": "avgpool", "ema_teacher": 0.9},
                                       {"generator_tokens": "all"}, {"num_global": 36, "learned_global": 4},
                                       {"generator_tokens": "all", "learned_global": 4},
                                       {"local_2d_pixels": True, "head_local_2d": True},
                                       {"unpack_codes": True, "bootstrap_norm": False}])
def test_stage1_gradients_reach_every_parameter(gen, overrides):
    m = SelfBootTok(tiny(**overrides)).train()
    losses = stage1_losses(m, images(gen, 2))
    losses["loss"].backward()
    for name, p in m.named_parameters():
        if name.startswith("generators."):
            continue  # trained in stage 2
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    if overrides.get("ema_teacher"):
        before = [p.clone() for p in m.teacher.parameters()]
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        update_teacher(m)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.teacher.parameters()))


def test_learned_global_tokens_are_free_of_regions(gen):
    c = tiny(num_global=36, learned_global=4)
    assert c.num_pooled == 32
    m = SelfBootTok(c).eval()
    assert int(m.tokenizer.decoder.cells.region.max()) == 31 and int(m.bootstrap.cells.region.max()) == 31
    # only the pooled queries change with the image before attention: blank the learned ones'
    # inputs and the pooled ones' differ between two images, the learned ones' do not
    enc = m.tokenizer.encoder
    seen = []
    handle = enc.vit.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, enc.n_patches:]))
    with torch.no_grad():
        enc(images(gen, 1))
        enc(images(gen, 1))
    handle.remove()
    a, b = seen
    assert not torch.allclose(a[:, :32], b[:, :32]) and torch.equal(a[:, 32:], b[:, 32:])
    for bad, message in (({"learned_global": 36, "num_global": 36}, r"learned_global must be in \[0, num_global=36\)"),
                         ({"learned_global": 2, "query_init": "learned"}, "learned_global needs query_init='pooled'")):
        with pytest.raises(ValueError, match=message):
            tiny(**bad)


def test_global_warmup_losses_leave_out_the_full_path(gen):
    m = SelfBootTok(tiny()).train()
    x = images(gen, 2)
    torch.manual_seed(0)
    full = stage1_losses(m, x)
    torch.manual_seed(0)
    warm = stage1_losses(m, x, full_path=False)
    assert "rec" in full and "rec" not in warm
    c = m.config
    torch.testing.assert_close(warm["loss"], full["loss"] - c.w_rec * full["rec"].detach())
    warm["loss"].backward()
    assert m.tokenizer.to_2d.weight.grad is None  # the 2D local tokens are only targets here
    assert m.tokenizer.encoder.patch.proj.weight.grad.abs().sum() > 0
    base = SelfBootTok(tiny(generator_tokens="all"))  # no local path: full_path changes nothing
    assert "rec" in stage1_losses(base, x, full_path=False)


def test_stage2_trains_only_generators_and_bootstrap(gen):
    # token conditioning: adaLN-zero starts every generator block as the identity, so at
    # initialisation the class embedding gets no gradient (tests/test_generators.py covers it)
    m = SelfBootTok(tiny(generator_cond="token")).train()
    losses = stage2_losses(m, images(gen, 2), [0, 5])
    assert {"gen_maskgit", "gen_ar", "rec_boot", "boot", "loss"} <= set(losses)
    losses["loss"].backward()
    trained = {id(p) for p in stage2_parameters(m)}
    for name, p in m.named_parameters():
        got = p.grad is not None and p.grad.abs().sum() > 0
        assert got == (id(p) in trained), name
    only_gen = stage2_losses(m, images(gen, 2), [0, 5], parts=("generator",))
    assert set(only_gen) == {"gen_maskgit", "gen_ar", "loss"}


def test_decode_uses_only_the_ids(model, gen):
    ids = model.tokenize(images(gen, 2)).global_ids
    first = model.decode(ids)
    model.reconstruct(images(gen, 4))  # anything else the model saw in between
    again = model.decode(ids)
    assert torch.equal(first, again)
    # one image's decode does not depend on the rest of the batch
    torch.testing.assert_close(model.decode(ids[1:]), first[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_generator_sequence_length(kind):
    for mode, length in (("global", 32), ("all", 40)):
        c = tiny(generator_tokens=mode, generators=[kind])
        assert c.num_quantized == length
        g = build_generator(kind, c)
        assert g.seq_len == length and g.pos.shape[0] == length + 1
        ids = g.generate(torch.tensor([1, 2]))
        assert ids.shape == (2, length) and ids.max() < c.vocab_size
    baseline = SelfBootTok(tiny(generator_tokens="all")).eval()
    t = baseline.tokenize(torch.zeros(1, 3, 32, 32))
    assert t.ids.shape == (1, 40) and t.local_1d is None and baseline.bootstrap is None


def test_ot_alignment_matches_pot(gen):
    ot = pytest.importorskip("ot")
    feats = torch.randn(1, 12, 6, generator=gen, dtype=torch.float64)
    slots = torch.randn(1, 4, 6, generator=gen, dtype=torch.float64)
    out = Alignment("ot", eps=0.05, n_iters=3000)(feats, slots)
    C = cosine_cost(feats, slots)[0].numpy()
    a, b = torch.full((12,), 1 / 12, dtype=torch.float64), torch.full((4,), 1 / 4, dtype=torch.float64)
    plan = ot.sinkhorn(a.numpy(), b.numpy(), C, reg=0.05, method="sinkhorn_log",
                       numItermax=100000, stopThr=1e-14)
    torch.testing.assert_close(out.plan[0], torch.from_numpy(plan), atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(out.tokens[0], 4 * torch.from_numpy(plan).T @ feats[0], atol=1e-8, rtol=1e-6)
    assert abs(out.loss.item() - (plan * C).sum()) < 1e-9
    torch.testing.assert_close(out.slot_mass, torch.ones(1, 4, dtype=torch.float64))


def test_save_load_round_trip(model, gen, tmp_path):
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = SelfBootTok.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x = images(gen, 2)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert torch.equal(loaded.generate([4], steps=2, seed=3), model.generate([4], steps=2, seed=3))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="does not match"):
        SelfBootTok.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SelfBootTok.from_pretrained(tmp_path / "missing")


def test_baseline_mode_ignores_the_local_token_settings(gen):
    """Baseline mode has no local tokens, so its models and losses do not depend on their settings
    (the quality report reuses baseline models across them)."""
    x = images(gen, 2)
    runs = []
    for local in ({}, {"local_2d_dim": 16, "local_2d_pixels": False, "head_local_2d": False}):
        torch.manual_seed(0)
        m = SelfBootTok(tiny(generator_tokens="all", **local))
        runs.append((m.state_dict(), stage1_losses(m, x)["loss"]))
    (a, loss_a), (b, loss_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loss_a, loss_b)


def test_models_saved_before_a_new_field_load_as_they_were_built(gen, tmp_path):
    import json

    from selfboottok.config import ADDED_FIELDS

    old = SelfBootTok(tiny(**ADDED_FIELDS)).eval()
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in ADDED_FIELDS:
        del saved[name]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = SelfBootTok.from_pretrained(tmp_path)
    assert loaded.config == old.config and loaded.tokenizer.pixels_2d is None
    x = images(gen, 2)
    assert torch.equal(loaded.reconstruct(x), old.reconstruct(x))


def test_seeded_runs_are_deterministic(gen):
    x = images(gen, 2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = SelfBootTok(tiny(seed=7)).train()
        loss = stage1_losses(m, x)["loss"]
        loss.backward()
        runs.append((loss.detach(), m.tokenizer.to_code.weight.grad.clone(),
                     m.eval().generate([1, 2], steps=3, seed=5)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    other = SelfBootTok(tiny(seed=8))
    assert not torch.equal(other.tokenizer.to_code.weight, m.tokenizer.to_code.weight)


def test_generator_flops_saving_at_b64():
    ours = SelfBootTokConfig.preset("b64")
    base = ours.with_overrides(generator_tokens="all")
    saving = 1 - generator_flops(ours) / generator_flops(base)
    assert saving >= 0.35
    # the fused attention op is counted: 4 B H Lq Lk D per call
    from selfboottok.ops import attention

    q = torch.empty(2, 3, 5, 8, device="meta")
    k = torch.empty(2, 3, 7, 8, device="meta")
    assert count_flops(lambda: attention(q, [k, k], [k, k])) == 4 * 2 * 3 * 5 * 14 * 8


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"images must be \[B,3,32,32\]"):
        model.tokenize(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"in \[-1,1\]"):
        model.tokenize(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"global_ids must be in \[0, 256\)"):
        model.decode(torch.full((1, 32), 256))
    with pytest.raises(ValueError, match=r"global_ids must be \[B,32\]"):
        model.decode(torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels"):
        model.generate([10])
    with pytest.raises(ValueError, match="generator must be"):
        model.generate([1], generator="diffusion")
    with pytest.raises(ValueError, match="image_size"):
        tiny(image_size=30)
    with pytest.raises(ValueError, match="head dim"):
        tiny(**{"encoder.heads": 8, "encoder.width": 96})
    with pytest.raises(ValueError, match="unknown field"):
        tiny(**{"encoder.size": 3})


def test_config_files_and_overrides(tmp_path):
    c = tiny(**{"encoder.depth": 3, "train.lr": 3e-4, "alignment": "softmax"})
    assert c.encoder.depth == 3 and c.train.lr == 3e-4
    for name in ("c.yaml", "c.json"):
        c.save(tmp_path / name)
        assert SelfBootTokConfig.load(tmp_path / name) == c
    (tmp_path / "p.yaml").write_text("preset: b64\nnum_local: 32\nencoder:\n  depth: 6\n")
    d = SelfBootTokConfig.load(tmp_path / "p.yaml", seed=3)
    assert (d.image_size, d.num_local, d.encoder.depth, d.encoder.width, d.seed) == (256, 32, 6, 768, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        SelfBootTokConfig.preset("huge")


def test_vq_initialises_from_data_and_restarts_dead_codes(gen):
    from selfboottok.models import VectorQuantizer

    vq = VectorQuantizer(16, 4, dead_steps=3).train()
    z = torch.randn(8, 8, 4, generator=gen).abs().requires_grad_()
    first = vq(z)
    assert first.usage > 0.5  # the codebook now holds latents of this batch
    first.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # a code nobody uses for dead_steps forwards moves to a latent of the batch
    with torch.no_grad():
        vq.embedding.weight[0] = -1.0  # opposite to every (positive) latent
    before = vq.embedding.weight[0].clone()
    for _ in range(4):
        vq(z)
    assert not torch.equal(vq.embedding.weight[0], before)
    with torch.no_grad():  # inference never changes the codebook
        book = vq.embedding.weight.clone()
        vq(torch.randn(2, 3, 4, generator=gen))
        assert torch.equal(book, vq.embedding.weight)


@pytest.mark.parametrize("mode", ["global", "all"])
def test_losses_and_sampling_under_bf16_autocast(gen, mode):
    # the trainers use bf16 autocast on GPU; CPU autocast takes the same paths (OT alignment in
    # fp32, the AR KV cache in the projections' dtype)
    m = SelfBootTok(SelfBootTokConfig.preset("tiny", generator_tokens=mode, generators=["maskgit", "ar"]))
    x = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (4,), generator=gen)
    with torch.autocast("cpu", torch.bfloat16):
        for losses in (stage1_losses(m, x), stage2_losses(m, x, y)):
            assert torch.isfinite(losses["loss"])
            losses["loss"].backward()
        m.eval()
        with torch.no_grad():
            for kind in ("maskgit", "ar"):
                out = m.generate(y, steps=2, generator=kind, seed=0)
                assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("grid,n", [(8, 16), (8, 4), (8, 24), (4, 5), (16, 64)])
def test_region_pool_is_the_mean_over_region_index(gen, grid, n):
    from selfboottok.models.layers import region_index, region_pool

    x = torch.randn(2, grid * grid, 8, generator=gen, dtype=torch.float64)
    idx = region_index(grid, n)
    assert idx.shape == (grid * grid,) and set(idx.tolist()) == set(range(n))
    pooled = region_pool(x, grid, n)
    assert pooled.shape == (2, n, 8)
    if round(n**0.5) ** 2 == n and grid % round(n**0.5) == 0:  # square regions: exact partition
        want = torch.stack([x[:, idx == r].mean(1) for r in range(n)], 1)
        torch.testing.assert_close(pooled, want)
    else:  # raster runs: each region's mean lies within its patches' range, in order
        centres = torch.stack([torch.arange(grid * grid, dtype=torch.float64)[idx == r].mean() for r in range(n)])
        assert torch.all(centres[1:] > centres[:-1])


@pytest.mark.parametrize("grid,n", [(8, 32), (8, 16), (8, 24), (8, 64)])
def test_region_cells_unpack_each_position_of_a_region(gen, grid, n):
    from selfboottok.models.layers import RegionCells, region_index

    codes = torch.randn(2, n, 5, generator=gen)
    shared = RegionCells(grid, n, 5, 16, unpack=False)
    own = RegionCells(grid, n, 5, 16, unpack=True)
    codes_w = torch.randn(2, n, 16, generator=gen)
    idx = region_index(grid, n)
    torch.testing.assert_close(shared(codes, codes_w), codes_w[:, idx])
    out = own(codes, codes_w)
    assert out.shape == (2, grid * grid, 16) and own.slots == max((idx == r).sum() for r in range(n))
    per_slot = own.unpack(codes).unflatten(-1, (own.slots, 16))
    for p in range(grid * grid):  # cell p: its region's code through the map of its place there
        place = int((idx[:p] == idx[p]).sum())
        torch.testing.assert_close(out[:, p], per_slot[:, idx[p], place])


def test_bootstrap_norm_off_leaves_the_predictions_free(gen):
    x = images(gen, 2)
    for norm in (True, False):
        m = SelfBootTok(tiny(bootstrap_norm=norm)).eval()
        with torch.no_grad():
            b1, b2 = m.bootstrap(m.tokenizer.encode(x).codes)
        for b in (b1, b2):
            normed = torch.allclose(b.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(
                b.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
            assert normed == norm


def test_hub_loading_and_push_offline(model, gen, tmp_path, monkeypatch):
    """from_pretrained takes a Hub id (the download mocked to return a local folder) and
    push_to_hub uploads config.json, model.safetensors and a model card (the upload mocked)."""
    import huggingface_hub

    folder = tmp_path / "local"
    model.save_pretrained(folder)
    calls = []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    loaded = SelfBootTok.from_pretrained("someone/selfboottok-tiny", revision="v1")
    assert calls[0][0] == "someone/selfboottok-tiny" and calls[0][1]["revision"] == "v1"
    assert set(calls[0][1]["allow_patterns"]) == {"config.json", "model.safetensors"}
    x = images(gen, 2)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert SelfBootTok.from_pretrained(folder) is not None and len(calls) == 1  # a local folder: no download

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/missing.*no network"):
        SelfBootTok.from_pretrained("someone/missing")

    pushed = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        pushed.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = model.push_to_hub("someone/selfboottok-tiny", token="hf_fake")
    assert url.endswith("/commit/0") and pushed["repo_id"] == "someone/selfboottok-tiny"
    assert set(pushed["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert pushed["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert b"selfboottok" in pushed["files"]["README.md"]
    with pytest.raises(FileNotFoundError, match="it does not exist"):
        SelfBootTok.from_pretrained("./not/a/folder")  # a path, never a Hub id


def test_ar_kv_cache_decoding_equals_the_full_causal_forward(gen):
    """The AR sampler's cached decoding runs the training blocks: in float64, logits of each
    cached step (one or two new positions at a time) equal the full causal forward's, and
    greedy sampling with guidance (a doubled batch) picks the ids the uncached forward picks."""
    from selfboottok.models.layers import KVCache

    # the plain Transformer's cache path; tests/test_generators.py runs every conditioning
    c = tiny(generators=["ar"], generator_cond="token", **{"generator.depth": 3})
    ar = build_generator("ar", c).double().eval()
    B, T = 3, c.num_quantized
    ids = torch.randint(0, c.vocab_size, (B, T), generator=gen)
    labels = torch.randint(0, c.num_classes, (B,), generator=gen)
    with torch.no_grad():
        full = ar(ids[:, :-1], labels)  # [B, T, V]: position t predicts token t
        emb = ar.embed(ids[:, :-1], labels)
        for step in (1, 2):
            cache = KVCache(T)
            cached = torch.cat([ar.head(ar.vit(emb[:, t:t + step], causal=True, cache=cache))
                                for t in range(0, T, step)], 1)
            torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match=f"KVCache holds {T} positions, {T + 1} requested"):
            ar.vit(emb[:, :1], causal=True, cache=cache)
        for guidance in (0.0, 3.0):
            sampled = ar.generate(labels, guidance=guidance, temperature=0)
            prefix = ids[:, :0]
            for t in range(T):
                logits = ar.guided(prefix, labels, guidance)[:, -1]
                prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], 1)
            assert torch.equal(sampled, prefix), guidance
