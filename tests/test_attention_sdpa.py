"""The sdpa backend on CUDA (each fused kernel PyTorch may pick, forced in turn) against the
float64 reference with FlashAttention's error rule, and how backend="auto" chooses on CUDA
tensors: the rule, the committed table and in-process timing, with tables and timings injected
so that the choice is tested without a GPU. The CPU side of sdpa is in tests/test_attention.py."""

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _attention_checks import check_flash_rule
from selfboottok.ops import _attention_auto as auto
from selfboottok.ops import attention
from selfboottok.ops._torch_impl import attention_allowed, attention_reference
from selfboottok.ops.attention import status, which_backend
from test_attention import forward_backward, make

ROOT = Path(__file__).resolve().parents[1]
H200 = "NVIDIA H200"
NAMES = ("out", "dq", "dk", "dv")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def table():
    """auto's measurements, replaced by the test; the committed file afterwards."""
    yield auto.set_table
    auto.set_table(None)
    auto.set_benchmark(False)


def key(passes="fwd", shape_class="short", gpu="GPU X"):
    return auto.Key(gpu, "bf16", 64, shape_class, False, passes)


# ---- the choice ---------------------------------------------------------------------------------

def test_a_kernel_must_beat_sdpa_on_every_shape_of_its_class(table):
    table({key(): {"sdpa": [1.0, 2.0], "cuda": [0.5, 2.5], "triton": [0.9, 1.9]}})
    name, why = auto.choose(key(), ["cuda", "triton"])
    assert name == "triton" and "triton is faster" in why
    # cuda is faster on the first shape only; without triton, sdpa stays
    assert auto.choose(key(), ["cuda"])[0] == "sdpa"
    # the fastest of several winners
    table({key(): {"sdpa": [1.0], "cuda": [0.5], "triton": [0.8]}})
    assert auto.choose(key(), ["cuda", "triton"])[0] == "cuda"
    # a kernel missing on one shape of the class is never picked
    table({key(): {"sdpa": [1.0, 1.0], "cuda": [0.5]}})
    assert auto.choose(key(), ["cuda"])[0] == "sdpa"


def test_no_measurement_means_sdpa(table):
    table({key(): {"sdpa": [1.0], "cuda": [0.1]}})
    for other in (key(passes="fwd+bwd"), key(shape_class="long"), key(gpu="GPU Y")):
        name, why = auto.choose(other, ["cuda", "triton"])
        assert name == "sdpa" and "no measurement" in why


def test_the_pick_traces_under_torch_compile(table):
    """attention() on CUDA tensors picks inside a torch.compile trace: the lookup must trace
    (fullgraph, with dynamic shapes on the recompile)."""
    table({key(): {"sdpa": [1.0], "triton": [0.5]}})

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        k = auto.key_for("GPU X", x.dtype, x.shape[3], x.shape[2], x.shape[2], False, False)
        return x * (3 if auto.pick(k, ["cuda", "triton"]) == "triton" else 2)

    for L, factor in ((256, 3), (300, 3), (5000, 2)):
        assert f(torch.ones(1, 1, L, 64, dtype=torch.bfloat16))[0, 0, 0, 0] == factor


def test_keys():
    assert [auto.shape_class(256, L) for L in (64, 512, 513, 2048, 4096)] == [
        "short", "short", "medium", "medium", "long"]
    k = auto.key_for(H200, torch.float16, 40, 300, 900, True, True)
    assert (k.dtype, k.head_dim, k.shape_class, k.causal, k.passes) == ("fp16", 64, "medium", True, "fwd+bwd")
    assert auto.key_for(H200, torch.bfloat16, 72, 1, 1, False, False).head_dim == 128


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", [(256, 12, 256, lk, 64) for lk in (64, 128, 320)]
                         + [(4, 16, 4096, 4096, d) for d in (64, 128)])
def test_committed_table_picks_sdpa_on_every_h200_bench_shape(shape, passes):
    """bench/results/attention-nvidia-h200.md: cuda 0.05-0.20x, triton 0.26-0.79x of SDPA."""
    B, H, Lq, Lk, D = shape
    k = auto.key_for(H200, torch.bfloat16, D, Lq, Lk, False, passes == "fwd+bwd")
    assert k in auto.table()
    name, why = auto.choose(k, ["cuda", "triton"])
    assert name == "sdpa" and "none faster" in why


def _bench_attention():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_table_is_written_from_the_committed_results(tmp_path):
    """attention_table.json is what `bench/attention.py --table-from` makes of the H200 results."""
    results = ROOT / "bench" / "results" / "attention-nvidia-h200.json"
    out = tmp_path / "table.json"
    data = json.loads(results.read_text())
    _bench_attention().write_table(out, data["meta"], data["rows"], results)
    assert auto.entries_from_json(json.loads(out.read_text())) == auto.table()


def test_in_process_timing_once_per_key(table):
    table({})
    calls = []
    fake_ms = {"sdpa": 1.0, "cuda": 0.7, "triton": 0.4}

    def measure(name):
        calls.append(name)
        return fake_ms[name]

    auto.set_benchmark(True)
    assert auto.benchmark_enabled()
    for _ in range(3):
        name, why = auto.choose(key(), ["cuda", "triton"], measure)
        assert name == "triton" and "timed in this process" in why
    assert sorted(calls) == ["cuda", "sdpa", "triton"]
    fake_ms["sdpa"] = 0.1  # a new key is timed afresh: sdpa wins there
    assert auto.choose(key(passes="fwd+bwd"), ["cuda", "triton"], measure)[0] == "sdpa"
    assert len(calls) == 6


@pytest.mark.parametrize("backward", [False, True])
def test_a_timing_trial_runs_the_backend(gen, backward):
    import importlib

    mod = importlib.import_module("selfboottok.ops.attention")
    q, k, v, mask = make(gen, 2, 2, 9, 13, 32, padded=True, dtype=torch.float32)
    mod._trial("sdpa", q, [k[:, :, :5], k[:, :, 5:]], [v[:, :, :5], v[:, :, 5:]], mask, True, 0.2, backward)
    assert q.grad is None  # the trial works on detached copies


def test_timing_is_off_under_deterministic_algorithms(table):
    auto.set_benchmark(True)
    try:
        torch.use_deterministic_algorithms(True)
        assert not auto.benchmark_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert auto.benchmark_enabled()


def test_ops_command_says_what_auto_picks():
    out = subprocess.run([sys.executable, "-m", "selfboottok.ops"], capture_output=True, text=True,
                         check=True).stdout
    assert "attention, auto on cpu tensors: sdpa" in out
    assert "(NVIDIA H200, bf16, D<=64, short, full, fwd) attention_table.json:" in out
    assert "none faster: sdpa" in out and "any call without a measurement: sdpa" in out
    assert "sinkhorn cpu backend: instruction set" in out


@pytest.mark.parametrize("kind", ["flash", "efficient", "cudnn"])
@pytest.mark.parametrize("case", [(33, 33, False, False), (40, 40, False, True), (33, 70, True, True),
                                  (70, 33, False, True), (70, 33, True, False)],
                         ids=lambda c: f"Lq{c[0]}-Lk{c[1]}-{'pad' if c[2] else 'nomask'}-{'causal' if c[3] else 'full'}")
def test_sdpa_cuda_calls_match_the_aten_schemas(monkeypatch, kind, case):
    """Without a GPU: each fused CUDA kernel's forward and backward call, run on meta tensors,
    type-checks against PyTorch's schema and meta function (argument kinds, shapes, the lse
    layouts); the GPU tests below check the numbers."""
    import importlib

    mod = importlib.import_module("selfboottok.ops.attention")
    Lq, Lk, padded, causal = case
    if kind == "flash" and (padded or (causal and Lq != Lk)):
        pytest.skip("flash takes no bias")
    monkeypatch.setattr(mod, "_sdpa_kind", lambda *args: kind)
    q = torch.empty(2, 3, Lq, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 3, Lk, 64, dtype=torch.bfloat16, device="meta")
    mask = torch.ones(2, Lk, dtype=torch.bool, device="meta") if padded else None
    out, lse = mod._sdpa_forward(q, k, k, mask, causal, 0.125)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    for delta in (None, lse):
        dq, dk, dv = mod._sdpa_backward(q, k, k, mask, causal, 0.125, out, lse, torch.empty_like(q), delta)
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


# ---- sdpa on CUDA ---------------------------------------------------------------------------------

# (B, H, Lq, Lk, D, mask, causal): mask None | "pad" | "empty" (batch row 1 has no key)
CUDA_CASES = [
    (2, 3, 128, 128, 64, None, False),
    (2, 3, 128, 128, 64, None, True),  # the kernels' own causal flag
    (2, 2, 100, 260, 128, None, True),  # Lq < Lk: a bottom-right bias
    (2, 2, 70, 33, 32, None, True),  # Lq > Lk: the first 37 rows see no key
    (3, 2, 64, 200, 64, "pad", False),
    (3, 2, 50, 50, 72, "empty", True),
    (2, 2, 1, 300, 64, "pad", False),
]
FUSED = {"auto": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
         "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def _sdpa_context(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, FUSED[kind])) if FUSED[kind] else contextlib.nullcontext()


@needs_gpu
@pytest.mark.parametrize("case", CUDA_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}-Lq{c[2]}-Lk{c[3]}-D{c[4]}-{c[5]}-{'causal' if c[6] else 'full'}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", list(FUSED))
def test_sdpa_cuda_matches_reference(gen, kind, dtype, case):
    from selfboottok.ops.attention import _sdpa_kind, _sdpa_plan

    B, H, Lq, Lk, D, mask_kind, causal = case
    q, k, v, mask = make(gen, B, H, Lq, Lk, D, padded=mask_kind is not None)
    if mask_kind == "empty":
        mask[1] = False
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    low = [t.to("cuda", dtype) for t in (q, k, v)]
    mask = None if mask is None else mask.cuda()
    with _sdpa_context(kind):
        try:
            bias, is_causal, _ = _sdpa_plan(low[0], low[1], mask, causal)
            fused = _sdpa_kind(*low, bias, is_causal, D**-0.5)
        except RuntimeError as exc:
            pytest.skip(f"{kind} does not serve this case: {exc}")
        if FUSED[kind] and fused != kind:
            pytest.skip(f"{kind} does not serve this case (SDPA picks {fused})")
        got = forward_backward(lambda *t: attention(*t, key_padding_mask=mask, causal=causal, backend="sdpa"),
                               *low, dout.cuda())
    ref = forward_backward(lambda *t: attention_reference(*t, mask, causal), *(t.cuda() for t in (q, k, v)),
                           dout.cuda())
    base = forward_backward(lambda *t: attention_reference(*t, mask, causal, upcast=False), *low, dout.cuda())
    check_flash_rule(dtype, dict(zip(NAMES, got)), dict(zip(NAMES, base)), dict(zip(NAMES, ref)))
    allowed = attention_allowed(mask, causal, Lq, Lk, "cuda")
    if allowed is not None:
        empty = ~allowed.expand(B, H, Lq, Lk).any(-1)
        assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


@needs_gpu
@pytest.mark.parametrize("kind", list(FUSED))
def test_sdpa_cuda_gradient_through_lse(gen, kind):
    """The op's lse output and its gradient (delta = rowsum(dout * out) - grad_lse)."""
    q, k, v, mask = make(gen, 2, 2, 40, 90, 64, padded=True, dtype=torch.float32)
    mask[1, :] = False
    q, k, v, mask = (t.cuda() for t in (q, k, v, mask))
    w_out = torch.randn(q.shape, generator=gen).cuda()
    w_lse = torch.randn(q.shape[:3], generator=gen).cuda()

    def loss(out, lse):
        return (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0.0).sum()

    args = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*args, mask, True, 0.2, return_lse=True)
    want = torch.autograd.grad(loss(*ref), args)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    with _sdpa_context(kind):
        try:
            got = torch.ops.selfboottok.attention(args[0], [args[1]], [args[2]], mask, True, 0.2, "sdpa")
            grads = torch.autograd.grad(loss(*got), args)
        except RuntimeError as exc:
            pytest.skip(f"{kind} does not serve this case: {exc}")
    torch.testing.assert_close(got[1].double(), ref[1], atol=1e-4, rtol=1e-4)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-3, rtol=1e-3)


@needs_gpu
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_cuda_opcheck(gen, padded):
    q, k, v, mask = make(gen, 2, 2, 5, 7, 16, padded=padded, dtype=torch.float16)
    q, k, v = (t.cuda() for t in (q, k, v))
    mask = None if mask is None else mask.cuda()
    ks = [k[:, :, :3].clone().requires_grad_(), k[:, :, 3:].clone().requires_grad_()]
    vs = [v[:, :, :3].clone().requires_grad_(), v[:, :, 3:].clone().requires_grad_()]
    torch.library.opcheck(torch.ops.selfboottok.attention.default,
                          (q.requires_grad_(), ks, vs, mask, True, 0.3, "sdpa"))


@needs_gpu
def test_auto_on_cuda_tensors(gen, table):
    q = torch.randn(2, 2, 64, 64, generator=gen).to("cuda", torch.bfloat16)
    gpu = torch.cuda.get_device_name(q.device)
    table({})
    name, why = which_backend(q, q, q)
    assert name == "sdpa" and "no measurement" in why
    table({auto.key_for(gpu, torch.bfloat16, 64, 64, 64, False, False): {"sdpa": [1.0], "triton": [0.5]}})
    triton_runs = status("cuda")["triton"][0]
    assert which_backend(q, q, q)[0] == ("triton" if triton_runs else "sdpa")
    # with gradients it is another key, without a measurement
    assert which_backend(q.requires_grad_(), q, q)[0] == "sdpa"
    # in-process timing: each candidate runs on the call's shapes, once per key
    auto.set_benchmark(True)
    name, why = which_backend(q.detach(), q.detach(), q.detach(), causal=True)
    assert name in ("sdpa", "cuda", "triton") and "timed in this process" in why
