"""The vocabulary-parallel losses in one process (a world of one), on every available device: the same
numbers as xent.cross_entropy / linear_cross_entropy on the whole vocabulary. The multi-rank cases are in
test_vocab_parallel.py (CPU, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import xent
from xent.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

OPTIONS = [{}, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}]


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    # gloo reduces CPU tensors; a CUDA tensor needs NCCL
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _problem(device, dtype=torch.float64, seed=0, V=29, D=6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 7, D, generator=g, dtype=dtype).to(device).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=dtype).to(device).requires_grad_()
    y = torch.randint(0, V, (2, 7), generator=g)
    y[0, 2] = y[1, 5] = -100
    w = (torch.rand(V, generator=g, dtype=dtype) + 0.5).to(device)
    return h, W, y.to(device), w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_world_of_one_equals_the_plain_loss(world_of_one, device, opts, reduction):
    if device.type == "cuda" and dist.get_backend() != "nccl":
        pytest.skip("the process group is gloo")
    h, W, y, w = _problem(device)
    o = dict(opts)
    if o.pop("weight", False):
        o["weight"] = w
    logits = (h @ W.T).detach().requires_grad_()
    got = vocab_parallel_cross_entropy(logits, y, reduction=reduction, **o)
    want = xent.cross_entropy(logits, y, reduction=reduction, **o)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.rand(got.shape, dtype=got.dtype, device=device)
    (g_got,) = torch.autograd.grad(got, logits, up)
    (g_want,) = torch.autograd.grad(want, logits, up)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    wc = o.pop("weight", None)
    fused = vocab_parallel_linear_cross_entropy(h, W, y, reduction=reduction, weight_classes=wc, shift=True,
                                                chunk_size=4, **o)
    plain = xent.linear_cross_entropy(h, W, y, reduction=reduction, weight_classes=wc, shift=True, **o)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (h, W), up[..., : fused.shape[-1]] if fused.dim() else None),
                    torch.autograd.grad(plain, (h, W), up[..., : plain.shape[-1]] if plain.dim() else None)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_world_of_one_float32_against_float64(world_of_one, device):
    if device.type == "cuda" and dist.get_backend() != "nccl":
        pytest.skip("the process group is gloo")
    h, W, y, w = _problem(device, dtype=torch.float32, seed=1)
    got = vocab_parallel_linear_cross_entropy(h, W, y, weight_classes=w, label_smoothing=0.1, z_loss=1e-3,
                                              reduction="none")
    ref = xent.cross_entropy((h.double() @ W.double().T), y, weight=w.double(), label_smoothing=0.1,
                             z_loss=1e-3, reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


def test_world_of_one_projection_dtype(world_of_one):
    """It always projects half inputs in float32: projection_dtype=torch.float32 equals the float32
    computation on the upcast inputs (as linear_cross_entropy with it); a half projection is refused."""
    h, W, y, _ = _problem("cpu", dtype=torch.bfloat16, seed=2)
    got = vocab_parallel_linear_cross_entropy(h, W, y, shift=True, projection_dtype=torch.float32)
    want = xent.linear_cross_entropy(h.detach().float(), W.detach().float(), y, shift=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, vocab_parallel_linear_cross_entropy(h, W, y, shift=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="projection_dtype must be None or torch.float32 here"):
        vocab_parallel_linear_cross_entropy(h, W, y, projection_dtype=torch.bfloat16)
