"""Corners where a plausible but wrong number used to come out (issue: no silent wrong number).

Each test is held against an independent reference: torch itself, a float64 computation written here,
or a property (scale invariance, equality of two spellings of the same loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xent
from xent import losses

# ---------- class weights whose valid sum is <= 0: divide exactly as torch does ----------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_class_weight_sum_equals_torch(reduction):
    x = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y, w = torch.tensor([0]), torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    ours = xent.cross_entropy(x, y, weight=w, reduction=reduction)
    ref = F.cross_entropy(x, y, weight=w, reduction=reduction)
    torch.testing.assert_close(ours, ref)  # torch 1.4644 for the mean (xent gave −1.4644)
    if reduction == "mean":
        assert abs(float(ours) - 1.4643688) < 1e-6


def test_mixed_sign_class_weights_value_and_grad_equal_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, -100, 6, 2, 3])
    w = torch.tensor([-2.0, 0.5, 1.0, -1.5, 0.2, 0.3, -0.1], dtype=torch.float64)  # Σ_valid w_y = −4.6
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = xent.cross_entropy(a, y, weight=w, label_smoothing=0.1)
    ref = F.cross_entropy(b, y, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)
    # fused: the same head and targets through linear_cross_entropy
    h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fused = xent.linear_cross_entropy(h, W, y, weight=w, label_smoothing=0.1, chunk_size=2)
    plain = F.cross_entropy(h @ W.T, y, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(torch.autograd.grad(fused, (h, W)), torch.autograd.grad(plain, (h, W)))


def test_zero_class_weight_sum_is_not_folded_into_a_number():
    # Σ_valid w_y = 0 with a valid target: torch divides by 0; so does xent (never a plausible figure)
    x, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
    w = torch.tensor([0.0, 1.0, 1.0])
    ref = F.cross_entropy(x, y, weight=w)
    ours = xent.cross_entropy(x, y, weight=w)
    assert not math.isfinite(float(ref)) and not math.isfinite(float(ours))


def test_all_ignored_with_class_weights_stays_zero():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    w = torch.tensor([-1.0, 1.0, 2.0, 0.5])
    loss = xent.cross_entropy(x, y, weight=w, z_loss=1e-2)
    (g,) = torch.autograd.grad(loss, x)
    assert float(loss) == 0.0 and not g.any()


# ---------- z-loss with class weights: averaged over the valid tokens, never over Σ w_y ----------

X = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]], dtype=torch.float64)
Y = torch.tensor([0, -100, 2])
W123 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def _torch_ce_plus_zloss(x, y, w, s, smoothing=0.0):
    """torch's weighted cross-entropy mean + s · mean over valid tokens of lse², written from torch ops."""
    valid = y != -100
    lse = torch.logsumexp(x[valid], dim=-1)
    return F.cross_entropy(x, y, weight=w, label_smoothing=smoothing) + s * lse.square().mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_zloss_with_class_weights_does_not_depend_on_their_scale(smoothing):
    one = xent.cross_entropy(X, Y, weight=W123, z_loss=1e-2, label_smoothing=smoothing)
    two = xent.cross_entropy(X, Y, weight=2 * W123, z_loss=1e-2, label_smoothing=smoothing)
    torch.testing.assert_close(one, two, rtol=1e-14, atol=0)  # was 0.5889143 vs 0.5731350
    torch.testing.assert_close(one, _torch_ce_plus_zloss(X, Y, W123, 1e-2, smoothing), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, "auto"])
def test_fused_zloss_with_class_weights_equals_torch(chunk_size):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (2, 6), generator=g)
    y[0, 2] = -100
    w = torch.rand(9, generator=g, dtype=torch.float64) * 3
    fused = xent.linear_cross_entropy(h, W, y, weight=w, z_loss=1e-2, chunk_size=chunk_size)
    ref = _torch_ce_plus_zloss((h @ W.T).reshape(-1, 9), y.reshape(-1), w, 1e-2)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(torch.autograd.grad(fused, (h, W)), torch.autograd.grad(ref, (h, W)))
    # num_items divides both parts alike
    fused_n = xent.linear_cross_entropy(h, W, y, weight=w, z_loss=1e-2, num_items=7,
                                        chunk_size=chunk_size)
    per = xent.linear_cross_entropy(h, W, y, weight=w, z_loss=1e-2, reduction="none")
    torch.testing.assert_close(fused_n, per.sum() / 7)


# ---------- num_items = 0: a step with nothing to learn is 0 with a zero gradient ----------


def test_num_items_zero_gives_zero_with_zero_gradient():
    x = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for loss in (xent.cross_entropy(x, labels, num_items=0),
                 xent.causal_lm_loss(x, labels, num_items_in_batch=torch.tensor(0)),
                 xent.tailr_loss(x, labels, gamma=0.1, num_items=0)):
        (g,) = torch.autograd.grad(loss, x)
        assert float(loss) == 0.0 and not g.any()
    h = torch.randn(2, 5, 4, requires_grad=True)
    W = torch.randn(11, 4, requires_grad=True)
    fused = xent.linear_cross_entropy(h, W, labels, shift=True, num_items=np.int64(0))
    gh, gw = torch.autograd.grad(fused, (h, W))
    assert float(fused) == 0.0 and not gh.any() and not gw.any()


def test_num_items_zero_with_valid_targets_is_refused():
    x, y = torch.randn(3, 5), torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match=r"num_items is 0 but 2 target\(s\) are valid"):
        xent.cross_entropy(x, y, num_items=0)
    with pytest.raises(ValueError, match=r"num_items is 0 but 2 target\(s\) are valid"):
        xent.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), y, num_items=0)


def test_patched_model_on_an_all_padding_step():
    transformers = pytest.importorskip("transformers")
    from xent.integrations.transformers import patch_causal_lm, unpatch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (2, 8))
    labels = torch.full_like(ids, -100)
    patch_causal_lm(model)
    try:
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(0))
        out.loss.backward()
    finally:
        unpatch(model)
    assert float(out.loss) == 0.0
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_numpy_num_items_is_accepted():
    x, y = torch.randn(4, 6), torch.tensor([1, 2, 3, -100])
    torch.testing.assert_close(xent.cross_entropy(x, y, num_items=np.int64(3)), xent.cross_entropy(x, y))


# ---------- precision at large logits: (m − z_y) + log Σ exp(z − m) in every path ----------

OFFSETS = [0.0, 1e3, 1e4]


def _exact_logits(offset, *, seed=0, n=12, V=40, D=8, device="cpu"):
    """hidden, weight, bias whose float32 logits h @ W.T + b are exact (multiples of 1/256 around the
    offset: 22 bits), so the fused path and the float64 reference see the very same logits."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-16, 17, (n, D), generator=g).float() / 16
    W = torch.randint(-16, 17, (V, D), generator=g).float() / 16
    b = torch.full((V,), offset)
    y = torch.randint(0, V, (n,), generator=g)
    return h.to(device), W.to(device), b.to(device), y.to(device)


def _ref_nll(logits64, y):
    return -torch.log_softmax(logits64, dim=-1).gather(-1, y[:, None]).squeeze(-1)


@pytest.mark.parametrize("offset", OFFSETS)
def test_plain_losses_keep_their_digits_at_large_logits(offset, device):
    h, W, b, y = _exact_logits(offset, device=device)
    z = torch.addmm(b, h, W.T)  # exact in float32
    ref = _ref_nll(z.double(), y)
    tol = dict(rtol=0, atol=2e-6)  # lse − z_y in float32 was 4.8e-4 off at 1e4 (torch: 1.3e-6)
    torch.testing.assert_close(xent.cross_entropy(z, y, reduction="none").double(), ref, **tol)
    torch.testing.assert_close(xent.focal_loss(z, y, gamma=0.0, reduction="none").double(), ref, **tol)
    torch.testing.assert_close(xent.poly_loss(z, y, epsilon=0.0, reduction="none").double(), ref, **tol)
    logq = torch.log_softmax(z.double(), dim=-1)
    smooth_ref = 0.9 * ref - 0.1 * logq.mean(dim=-1)
    torch.testing.assert_close(xent.cross_entropy(z, y, label_smoothing=0.1, reduction="none").double(),
                               smooth_ref, **tol)
    w = torch.linspace(0.5, 2.0, z.shape[-1], device=device)
    wsmooth_ref = 0.9 * w.double()[y] * ref - 0.1 / z.shape[-1] * (w.double() * logq).sum(-1)
    torch.testing.assert_close(
        xent.cross_entropy(z, y, weight=w, label_smoothing=0.1, reduction="none").double(), wsmooth_ref,
        rtol=0, atol=4e-6)
    # causal: the same rows as a [1, T, V] sequence
    labels = torch.cat([torch.tensor([-100], device=device), y])[None]
    causal = xent.causal_lm_loss(torch.cat([z, z[:1]])[None], labels, reduction="none")
    torch.testing.assert_close(causal[0].double(), ref, **tol)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-8}], ids=str)
def test_fused_keeps_its_digits_at_large_logits(offset, opts, device):
    h, W, b, y = _exact_logits(offset, seed=1, device=device)
    h.requires_grad_()
    fused = xent.linear_cross_entropy(h, W, y, linear_bias=b, reduction="none", chunk_size=5, **opts)
    z64 = torch.addmm(b, h.detach(), W.T).double().requires_grad_()
    ref = xent.cross_entropy(z64, y, reduction="none", **opts)  # float64 in, float64 math
    torch.testing.assert_close(fused.double(), ref.detach(), rtol=0, atol=2e-6 + 1e-8 * offset**2 * 1e-6)
    (gh,) = torch.autograd.grad(fused.sum(), h)
    (gz,) = torch.autograd.grad(ref.sum(), z64)
    torch.testing.assert_close(gh.double(), gz @ W.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("offset", OFFSETS)
def test_losses_beyond_ce_keep_their_digits(offset, device):
    h, W, b, y = _exact_logits(offset, seed=2, device=device)
    z = torch.addmm(b, h, W.T)
    z64 = z.double()
    for loss in (losses.TaiLr(gamma=0.1), losses.GOLD(), losses.Focal(gamma=2.0), losses.Poly(epsilon=1.0)):
        plain = loss(z, y).double()
        ref = loss(z64, y)  # the same definition in float64 on the same logits
        torch.testing.assert_close(plain, ref, rtol=0, atol=4e-6)
        fused = xent.linear_loss(h, W, y, linear_bias=b, loss=loss, reduction="none", chunk_size=5)
        torch.testing.assert_close(fused.double(), ref, rtol=0, atol=4e-6)


@pytest.mark.parametrize("value", [1.0, 1e4, 3e5])
def test_bfloat16_row_of_equal_logits_is_log_v(value, device):
    V = 64
    z = torch.full((3, V), value, dtype=torch.bfloat16, device=device)
    y = torch.tensor([0, 5, 63], device=device)
    log_v = torch.full((3,), math.log(V), device=device)
    assert torch.allclose(xent.cross_entropy(z, y, reduction="none"), log_v, rtol=0, atol=1e-6)
    # fused in bfloat16: every head row identical, so every logit is the same bf16 number
    h = torch.ones(3, 4, dtype=torch.bfloat16, device=device)
    W = torch.full((V, 4), value / 4, dtype=torch.bfloat16, device=device)
    fused = xent.linear_cross_entropy(h, W, y, reduction="none")
    assert torch.allclose(fused, log_v, rtol=0, atol=1e-6)


# ---------- skew reverse KL at alpha = 0 is reverse KL, gradients included ----------


@pytest.mark.parametrize("fused", [False, True])
def test_skew_reverse_kl_alpha_zero_is_reverse_kl(fused):
    g = torch.Generator().manual_seed(9)
    s = (torch.randn(6, 50, generator=g) * 30).requires_grad_()  # log p − log q far below −88
    t = torch.randn(6, 50, generator=g) * 30

    def run(kind, alpha):
        if fused:
            eye = torch.eye(50)
            return xent.linear_distill_loss(s, eye, t, eye, kind=kind, alpha=alpha, chunk_size=4)
        return xent.distill_loss(s, t, kind=kind, alpha=alpha)

    skew, rev = run("skew_reverse_kl", 0.0), run("reverse_kl", 0.1)
    g_skew, g_rev = torch.autograd.grad(skew, s), torch.autograd.grad(rev, s)
    assert torch.isfinite(g_skew[0]).all()
    torch.testing.assert_close(skew, rev)
    torch.testing.assert_close(g_skew, g_rev)
    skew_kl, fkl = run("skew_kl", 0.0), run("forward_kl", 0.1)
    torch.testing.assert_close(skew_kl, fkl)
    torch.testing.assert_close(torch.autograd.grad(skew_kl, s), torch.autograd.grad(fkl, s))


# ---------- double backward: a clear error, never a silently missing second-order term ----------


def _penalty_grad(loss_fn, h):
    (g,) = torch.autograd.grad(loss_fn(h), h, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), h)
    return gg


def test_plain_path_supports_double_backward_like_torch():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=g)
    ours = _penalty_grad(lambda a: xent.cross_entropy(a @ W.T, y, label_smoothing=0.1), h)
    ref = _penalty_grad(lambda a: F.cross_entropy(a @ W.T, y, label_smoothing=0.1), h)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("path", ["linear_cross_entropy", "linear_loss_tailr", "linear_distill", "distill"])
def test_fused_double_backward_raises(path):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    W = torch.randn(7, 4, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    calls = {
        "linear_cross_entropy": lambda a: xent.linear_cross_entropy(a, W, y),
        "linear_loss_tailr": lambda a: xent.linear_loss(a, W, y, loss=losses.TaiLr(gamma=0.1)),
        "linear_distill": lambda a: xent.linear_distill_loss(a, W, a.detach() * 2, W),
        "distill": lambda a: xent.distill_loss(a @ W.T, (a @ W.T).detach() * 2),
    }
    with pytest.raises(RuntimeError, match="differentiate twice"):
        _penalty_grad(calls[path], h)


# ---------- small integer targets: widened to int64 ----------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_targets(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, generator=g)
    y64 = torch.randint(0, 9, (2, 6), generator=g)
    y = y64.to(dtype)
    torch.testing.assert_close(xent.cross_entropy(x, y), F.cross_entropy(x.reshape(-1, 9), y64.reshape(-1)))
    torch.testing.assert_close(xent.causal_lm_loss(x, y), xent.causal_lm_loss(x, y64))
    torch.testing.assert_close(xent.tailr_loss(x, y, gamma=0.1), xent.tailr_loss(x, y64, gamma=0.1))
    torch.testing.assert_close(xent.distill_loss(x, x.flip(-1), y, hard_weight=0.5),
                               xent.distill_loss(x, x.flip(-1), y64, hard_weight=0.5))
    h, W = torch.randn(2, 6, 5, generator=g), torch.randn(9, 5, generator=g)
    torch.testing.assert_close(xent.linear_cross_entropy(h, W, y, shift=True),
                               xent.linear_cross_entropy(h, W, y64, shift=True))
    if dtype == torch.uint8:  # torch takes uint8 itself
        torch.testing.assert_close(xent.cross_entropy(x.reshape(-1, 9), y.reshape(-1)),
                                   F.cross_entropy(x.reshape(-1, 9), y.reshape(-1)))


def test_signed_small_targets_keep_ignore_index():
    x = torch.randn(4, 9)
    y = torch.tensor([1, -100, 3, 8], dtype=torch.int8)
    torch.testing.assert_close(xent.cross_entropy(x, y), F.cross_entropy(x, y.long()))


# ---------- option errors: one clear line, before any work ----------

H, WT, YT = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call,exc,message", [
    (lambda: xent.linear_cross_entropy(H, WT, YT, chunk_size=True), ValueError,
     r"chunk_size must be 'auto' or an int >= 1, got True"),
    (lambda: xent.linear_cross_entropy(H, WT, YT, softcap=float("inf")), ValueError,
     r"softcap must be a finite number, got inf"),
    (lambda: xent.linear_cross_entropy(H, WT, YT, ignore_index=None), TypeError,
     r"ignore_index must be an int, got None"),
    (lambda: xent.linear_loss(H, WT, YT, loss=losses.Distill()), TypeError,
     r"loss Distill takes 1 extra tensor\(s\) per token .* use xent.linear_distill_loss"),
    (lambda: xent.tailr_loss(torch.randn(4, 6), YT, gamma="0.1"), TypeError,
     r"gamma must be a number, got '0.1' of type str"),
])
def test_bad_options(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_bad_chunk_budget_env(monkeypatch):
    monkeypatch.setenv("XENT_CHUNK_MB", "abc")
    with pytest.raises(ValueError, match=r"XENT_CHUNK_MB must be a number of MiB > 0, got 'abc'"):
        xent.linear_cross_entropy(H, WT, YT)
    monkeypatch.setenv("XENT_CHUNK_MB", "0.5")
    torch.testing.assert_close(xent.linear_cross_entropy(H, WT, YT), F.cross_entropy(H @ WT.T, YT))
