"""The extension loader: fallback when the compiled extension is missing, and the JIT build."""

import subprocess
import sys
import textwrap

import pytest
import torch

BLOCK_EXTENSION = "import sys; sys.modules['selfboottok._C'] = None\n"


def run_python(code, env_extra, tmp_path):
    import os

    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)


def test_missing_extension_falls_back_with_one_log_line(tmp_path):
    code = BLOCK_EXTENSION + textwrap.dedent("""
        import torch
        from selfboottok.ops import sinkhorn, backend_status
        assert not backend_status("cpu")["cpu"][0]
        res = sinkhorn(torch.rand(2, 5, 4, dtype=torch.float64), eps=0.1, n_iters=10)
        res2 = sinkhorn(torch.rand(2, 5, 4, dtype=torch.float64), eps=0.1, n_iters=10)
        assert torch.isfinite(res.plan).all()
        print("OK")
    """)
    out = run_python(code, {"SELFBOOTTOK_NO_JIT": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    logged = [line for line in out.stderr.splitlines() if "selfboottok" in line]
    assert len(logged) == 1 and "next backend" in logged[0], out.stderr


def test_jit_build_when_extension_is_missing(tmp_path):
    code = BLOCK_EXTENSION + textwrap.dedent("""
        import torch
        from selfboottok.ops import sinkhorn
        from selfboottok.ops._torch_impl import sinkhorn_reference
        cost = torch.rand(3, 7, 5, dtype=torch.float64)
        a = torch.full((3, 7), 1 / 7, dtype=torch.float64)
        b = torch.full((3, 5), 1 / 5, dtype=torch.float64)
        res = sinkhorn(cost, a, b, eps=0.1, n_iters=30, backend="cpu")
        ref = sinkhorn_reference(cost, a, b, 0.1, 30)
        torch.testing.assert_close(res.plan, ref[0])
        print("OK")
    """)
    out = run_python(code, {"SELFBOOTTOK_CACHE": str(tmp_path / "cache"), "SELFBOOTTOK_CUDA": "0"},
                     tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    assert any((tmp_path / "cache").rglob("*.so"))


def test_bad_selfboottok_cuda_value_is_rejected(monkeypatch):
    from selfboottok.ops import _build

    monkeypatch.setenv("SELFBOOTTOK_CUDA", "yes")
    with pytest.raises(ValueError, match="SELFBOOTTOK_CUDA"):
        _build.want_cuda()


def test_cuda_kernels_compile_only_for_a_visible_gpu_unless_forced(monkeypatch):
    import torch

    from selfboottok.ops import _build

    if torch.version.cuda is None or _build.find_cuda_home() is None:
        pytest.skip("needs a CUDA build of torch and nvcc")
    monkeypatch.delenv("SELFBOOTTOK_CUDA", raising=False)
    ok, why = _build.want_cuda()
    assert ok == torch.cuda.is_available() and ("GPU" in why)
    monkeypatch.setenv("SELFBOOTTOK_CUDA", "1")
    assert _build.want_cuda() == (True, "SELFBOOTTOK_CUDA=1")
    monkeypatch.setenv("SELFBOOTTOK_CUDA", "0")
    assert not _build.want_cuda()[0]


def test_sources_are_listed_once_and_exist():
    from selfboottok.ops import _build

    cpp, cu = _build.sources()
    assert cpp and all(p.endswith(".cpp") for p in cpp)
    assert all(p.endswith(".cu") for p in cu)
    assert len(set(cpp + cu)) == len(cpp + cu)
    import os

    assert all(os.path.isfile(p) for p in cpp + cu)
    if torch.version.cuda:
        assert cu, "CUDA sources must be listed"


def _bad_sinkhorn_kernel_arguments(device):
    """(op, message pattern, args): sinkhorn_kernel calls with one bad argument each."""
    C = torch.rand(2, 3, 4, device=device)
    a, b = torch.full((2, 3), 1 / 3, device=device), torch.full((2, 4), 0.25, device=device)
    nan = C.clone()
    nan[1, 2, 3] = float("nan")
    cases = [
        (r"cost must be \[B, N, M\]", C[0], a, b, 0.1, 10, -1.0),
        ("cost must be float32 or float64", C.half(), a.half(), b.half(), 0.1, 10, -1.0),
        (r"a must be \[B, N\] = \[2, 3\]", C, a[:, :2], b, 0.1, 10, -1.0),
        (r"b must be \[B, M\] = \[2, 4\]", C, a, b[:1], 0.1, 10, -1.0),
        ("a and b must have the dtype of cost", C, a.double(), b, 0.1, 10, -1.0),
        ("eps must be > 0", C, a, b, 0.0, 10, -1.0),
        ("max_iters must be >= 0", C, a, b, 0.1, -1, -1.0),
        ("N, M > 0", C[:, :0], a[:, :0], b, 0.1, 10, -1.0),
    ]
    if device == "cpu":  # the CUDA kernel leaves the value checks to selfboottok::sinkhorn
        cases.append(("NaN or Inf", nan, a, b, 0.1, 10, -1.0))
    else:  # on CPU, a tensor of another device (meta) would dispatch elsewhere
        cases.append(("a and b must be on the device of cost", C, a, b.cpu(), 0.1, 10, -1.0))
    return [("sinkhorn_kernel", match, args) for match, *args in cases]


def _raw_kernel_ops(device):
    """The compiled ops (selfboottok::*_kernel) registered for `device` tensors."""
    from selfboottok.ops import _backend

    if _backend.extension()[0] is None:
        pytest.skip("no compiled extension")
    names = [n for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("selfboottok::") and n.endswith("_kernel")]
    return sorted(n.split("::")[1] for n in names
                  if torch._C._dispatch_has_kernel_for_dispatch_key(n, device.upper()))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_raw_kernel_ops_reject_bad_arguments(gen, device):
    """Every raw kernel op raises a ValueError naming the bad argument (its message is built in
    host-compiled C++, csrc/arg_checks.cpp), never crashes."""
    from test_attention_cuda_emu import bad_kernel_arguments

    ops = _raw_kernel_ops(device)
    assert ops or device != "cpu", "sinkhorn_kernel has a CPU kernel in every build"
    cases = _bad_sinkhorn_kernel_arguments(device) + bad_kernel_arguments(gen, device)
    missing = set(ops) - {op for op, _, _ in cases}
    assert not missing, f"raw kernel ops without bad-argument cases: {missing}"
    for op, match, args in cases:
        if op in ops:
            with pytest.raises(ValueError, match=match):
                getattr(torch.ops.selfboottok, op)(*args)
