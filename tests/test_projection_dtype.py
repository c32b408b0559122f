"""projection_dtype=torch.float32: half inputs projected in float32 give exactly the float32 computation on
the upcast inputs (values and gradients), for every fused function; the default (half projection) does not."""

import pytest
import torch

import xent

V_, D_ = 301, 24


def _inputs(dtype, seed=0, shape=(3, 40)):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, D_, generator=g) * 2).to(dtype).requires_grad_()
    W = torch.randn(V_, D_, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V_, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    y[0, :5] = -100
    return h, W, b, y


def _upcast(*xs):
    return [x.detach().float().requires_grad_() for x in xs]


def _run(fn, tensors):
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    # a scalar loss gets the upstream gradient 1 (loss.backward()): its stored half gradients are then
    # final; per-token outputs get random upstream gradients
    sum(o if o.dim() == 0 else (o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs], [t.grad for t in tensors]


FUNCTIONS = {
    "linear_cross_entropy": lambda h, W, b, y, **kw: xent.linear_cross_entropy(
        h, W, y, linear_bias=b, shift=True, z_loss=1e-4, chunk_size=17, **kw),
    "linear_cross_entropy_none": lambda h, W, b, y, **kw: xent.linear_cross_entropy(
        h, W, y, linear_bias=b, reduction="none", chunk_size=17, **kw),
    "linear_loss_tailr": lambda h, W, b, y, **kw: xent.linear_loss(
        h, W, y, linear_bias=b, loss=xent.losses.TaiLr(gamma=0.1), chunk_size=17, **kw),
    "linear_log_probs": lambda h, W, b, y, **kw: xent.linear_log_probs(
        h, W, y, linear_bias=b, shift=True, temperature=0.8, with_entropy=True, chunk_size=17, **kw),
    "linear_distill_loss": lambda h, W, b, y, **kw: xent.linear_distill_loss(
        h, W, (h * 0.5).detach(), W.detach().flip(0), y, kind="jsd", student_bias=b, chunk_size=17, **kw),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_half_projected_in_float32_equals_the_float32_computation(name, dtype):
    fn = FUNCTIONS[name]
    h, W, b, y = _inputs(dtype)
    hf, Wf, bf = _upcast(h, W, b)
    got, got_grads = _run(lambda *t: fn(*t, y, projection_dtype=torch.float32), [h, W, b])
    ref, ref_grads = _run(lambda *t: fn(*t, y), [hf, Wf, bf])
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    for a, r in zip(got_grads, ref_grads):
        assert a.dtype == dtype  # gradients come back in the inputs' dtype: the float32 ones, rounded once
        torch.testing.assert_close(a, r.to(dtype), rtol=0, atol=0)
    # the default projects in the half dtype (CPU float16 excepted): visibly further from float32
    if not (dtype == torch.float16 and h.device.type == "cpu"):
        default, _ = _run(lambda *t: fn(*t, y), [x.detach().requires_grad_() for x in (h, W, b)])
        assert max(float((a - r).abs().max()) for a, r in zip(default, ref)) > 1e-5


def test_bad_projection_dtype_is_refused():
    h, W, b, y = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"must be None or one of \[torch.float32\].*bfloat16"):
        xent.linear_cross_entropy(h, W, y, projection_dtype=torch.bfloat16)
    hb, Wb, _, _ = _inputs(torch.bfloat16)
    with pytest.raises(ValueError, match="projection_dtype .* got torch.float16"):
        xent.linear_log_probs(hb, Wb, y, projection_dtype=torch.float16)
    with pytest.raises(ValueError, match="projection_dtype .* got 'float32'"):
        xent.linear_loss(hb, Wb, y, projection_dtype="float32")
