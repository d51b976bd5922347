"""Sinkhorn CUDA and Triton backends on a GPU, against the float64 torch reference (which the
CPU tests tie to POT). Needs no POT, so it runs on GPU machines without it."""

import pytest
import torch

from conftest import backends_for, random_problem
from selfboottok.ops import sinkhorn
from selfboottok.ops._torch_impl import sinkhorn_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 5, 7), (3, 37, 13), (2, 16, 64), (8, 256, 64), (2, 300, 129)]
REL_EPS = [1.0, 1e-1, 1e-2, 1e-3]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rel_eps", REL_EPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_backends_match_reference(gen, backend, dtype, rel_eps, shape):
    if backend not in backends_for("cuda"):
        pytest.skip(f"{backend} unavailable on this GPU machine")
    if backend == "triton":
        from selfboottok.ops.triton.sinkhorn import fits

        if not fits(*shape[1:]):
            pytest.skip("larger than one Triton program's tile")
    cost, a, b = random_problem(gen, *shape, ragged=True)
    eps = float(rel_eps * (cost.max() - cost.min()))
    ref = sinkhorn_reference(cost, a, b, eps, 200)
    args = [t.to(dtype).cuda() for t in (cost, a, b)]
    res = sinkhorn(*args, eps=eps, n_iters=200, backend=backend)
    # within 2x of the same-dtype torch reference's own error
    same = sinkhorn_reference(*args, eps, 200)[0].double().cpu()
    atol = max(2 * (same - ref[0]).abs().max().item(), (1e-10 if dtype == torch.float64 else 1e-6) * ref[0].max().item())
    torch.testing.assert_close(res.plan.double().cpu(), ref[0], atol=atol, rtol=0)
    tol_res = sinkhorn(cost.cuda(), a.cuda(), b.cuda(), eps=eps, n_iters=5000, tol=1e-6,
                       backend=backend)
    tol_ref = sinkhorn_reference(cost, a, b, eps, 5000, tol=1e-6)
    assert (tol_res.n_iters.cpu() - tol_ref[3]).abs().max() <= 1


def test_gpu_gradients_match_cpu(gen):
    cost, a, b = random_problem(gen, 2, 9, 5)
    grads = []
    for device in ("cpu", "cuda"):
        c = cost.to(device).requires_grad_()
        res = sinkhorn(c, a.to(device), b.to(device), eps=0.2, n_iters=5000, tol=1e-14)
        (res.plan.square().sum() + res.value.sum()).backward()
        grads.append(c.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-7)
