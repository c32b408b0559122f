"""Edges where a wrong input must not become a plausible number or a traceback from deep inside:
boolean flags, multi-token streams, Rho-1's reference losses, a +inf logit on every path, and a sparse
teacher's padding at ignored positions."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import xent
from xent import _cpu_kernel

# ---------- boolean flags: exactly True or False ----------

V, D = 7, 4
_g = torch.Generator().manual_seed(0)
_X = torch.randn(2, 5, V, generator=_g)
_H = torch.randn(2, 5, D, generator=_g)
_W = torch.randn(V, D, generator=_g)
_Y = torch.randint(0, V, (2, 5), generator=_g)
_IDS = torch.tensor([1, 4]).expand(2, 5, 2)
_LP = torch.log(torch.tensor([0.5, 0.2])).expand(2, 5, 2)

# a valid call of every public function and loss class that has a boolean option, by name
CALLS = {
    "cross_entropy": lambda **f: xent.cross_entropy(_X, _Y, **f),
    "causal_lm_loss": lambda **f: xent.causal_lm_loss(_X, _Y, **f),
    "count_items": lambda **f: xent.count_items(_Y, **f),
    "focal_loss": lambda **f: xent.focal_loss(_X, _Y, **f),
    "distill_loss": lambda **f: xent.distill_loss(_X, _X.flip(-1), _Y, **f),
    "log_probs": lambda **f: xent.log_probs(_X, _Y, **f),
    "linear_log_probs": lambda **f: xent.linear_log_probs(_H, _W, _Y, **f),
    "linear_loss": lambda **f: xent.linear_loss(_H, _W, _Y, **f),
    "linear_cross_entropy": lambda **f: xent.linear_cross_entropy(_H, _W, _Y, **f),
    "linear_distill_loss": lambda **f: xent.linear_distill_loss(_H, _W, _H.flip(-1), _W, _Y, **f),
    "linear_sparse_distill_loss": lambda **f: xent.linear_sparse_distill_loss(_H, _W, _IDS, _LP, _Y, **f),
    "linear_rho1_loss": lambda **f: xent.linear_rho1_loss(_H, _W, _Y, ref_losses=torch.ones(2, 5), **f),
    "Focal": lambda **f: xent.losses.Focal(**f),
    "Distill": lambda **f: xent.losses.Distill(**f),
}


def _bool_options():
    """(name, flag) of every keyword whose default is a bool, in xent's public functions and loss classes:
    a new flag without an entry in CALLS fails test_every_flag_is_covered."""
    found = []
    # not the lazily imported subpackages: xent.keras would import TensorFlow into this process, after
    # which importing triton (the Triton tests, torch's own probes) aborts on LLVM's duplicate options
    lazy = {"nn", "eval", "parallel", "integrations", "keras"}
    public = {n: getattr(xent, n) for n in set(xent.__all__) - lazy if callable(getattr(xent, n))}
    public.update({n: getattr(xent.losses, n) for n in xent.losses.__all__})
    for name, f in sorted(public.items()):
        try:
            params = inspect.signature(f).parameters.values()
        except (TypeError, ValueError):
            continue
        found += [(name, p.name) for p in params if isinstance(p.default, bool)]
    return found


BOOL_OPTIONS = _bool_options()


def test_every_flag_is_covered():
    assert len(BOOL_OPTIONS) >= 19  # 19 today: return_stats, shift, with_entropy, t_squared, detach_factor
    assert {name for name, _ in BOOL_OPTIONS} <= set(CALLS), BOOL_OPTIONS


@pytest.mark.parametrize("bad", ["yes", "no", 1, 0, None, torch.tensor(True)], ids=repr)
@pytest.mark.parametrize("name,flag", BOOL_OPTIONS)
def test_non_bool_flags_are_refused(name, flag, bad):
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got .* of type"):
        CALLS[name](**{flag: bad})
    CALLS[name](**{flag: True})  # the same call with a real bool is fine


def test_nn_module_and_vocab_parallel_flags():
    with pytest.raises(TypeError, match="return_stats must be True or False"):
        xent.nn.CrossEntropyLoss(return_stats="yes")(_X, _Y)
    for flag in ("shift", "sum_hidden_grad"):  # refused before the process group is looked at
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'yes'"):
            xent.parallel.vocab_parallel_linear_cross_entropy(_H, _W, _Y, **{flag: "yes"})


# ---------- multi-token streams ----------

@pytest.mark.parametrize("fn,name,make", [
    (lambda s: xent.multi_token_loss(s, _Y), "logits", lambda *shape: torch.randn(*shape, V)),
    (lambda s: xent.linear_multi_token_loss(s, _W, _Y), "hiddens", lambda *shape: torch.randn(*shape, D)),
])
def test_multi_token_streams_are_checked(fn, name, make):
    with pytest.raises(ValueError, match=rf"^{name} is an empty list: multi-token prediction needs K >= 1"):
        fn([])
    with pytest.raises(ValueError, match=rf"^{name}\[1\] has shape \(2, 4, \d\) but {name}\[0\] has shape "
                                         r"\(2, 5, \d\): every stream must have the same shape"):
        fn([make(2, 5), make(2, 4)])
    with pytest.raises(ValueError, match=rf"^{name}\[1\] has dtype torch.float64"):
        fn([make(2, 5), make(2, 5).double()])
    with pytest.raises(TypeError, match=rf"^{name}\[2\] must be a torch.Tensor, got float"):
        fn([make(2, 5), make(2, 5), 1.0])
    # a list and the stacked tensor are the same call
    streams = [make(2, 5), make(2, 5)]
    torch.testing.assert_close(fn(streams), fn(torch.stack(streams)), rtol=0, atol=0)


# ---------- Rho-1: the reference losses are finite wherever they are read ----------

@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan])
@pytest.mark.parametrize("fused", [False, True])
def test_rho1_refuses_non_finite_reference_losses(value, fused):
    y = _Y.clone()
    y[0, 0] = -100
    ref = torch.full((2, 5), 1.5)

    def run(r):
        if fused:
            return xent.linear_rho1_loss(_H, _W, y, ref_losses=r, ratio=0.5)
        return xent.rho1_loss(_X, y, r, ratio=0.5)

    bad = ref.clone()
    bad[1, 3] = value
    with pytest.raises(ValueError, match=r"^ref_losses has 1 non-finite value\(s\) at valid targets "
                                         rf"\(the first is {value}\)"):
        run(bad)
    ignored = ref.clone()
    ignored[0, 0] = value  # an ignored target's reference is never read
    assert torch.equal(run(ignored), run(ref))


# ---------- a +inf logit: NaN, as torch, on every path ----------

def _inf_case():
    """hidden [4, 3] and a head whose class 1 has weight (+inf, 0, 0): rows 0 and 1 have a +inf logit
    (row 0's target is that class, row 1's is not), rows 2 and 3 a −inf one (a masked class)."""
    h = torch.tensor([[0.5, 0.2, -0.1], [1.5, -0.3, 0.4], [-0.7, 0.1, 0.9], [-0.2, -1.0, 0.3]])
    w = torch.tensor([[0.3, -0.2, 0.5], [math.inf, 0.0, 0.0], [-0.4, 0.6, 0.1], [0.2, 0.2, -0.7]])
    y = torch.tensor([1, 0, 2, 3])
    return h, w, y


def test_torch_convention_for_inf_logits():
    h, w, y = _inf_case()
    z = h @ w.T
    assert z[0, 1] == math.inf and z[1, 1] == math.inf and z[2, 1] == -math.inf
    want = F.cross_entropy(z, y, reduction="none")
    assert torch.isnan(want[:2]).all() and torch.isfinite(want[2:]).all()


@pytest.mark.parametrize("path", ["plain", "fused-kernel-off", "fused-kernel-on"])
def test_inf_logit_gives_nan_as_torch(path, monkeypatch):
    h, w, y = _inf_case()
    zt = (h @ w.T).requires_grad_()
    want = F.cross_entropy(zt, y, reduction="none")
    (g_want,) = torch.autograd.grad(want[2:].sum(), zt)
    if path == "plain":
        z = (h @ w.T).requires_grad_()
        got = xent.cross_entropy(z, y, reduction="none")
        (g_got,) = torch.autograd.grad(got[2:].sum(), z, retain_graph=True)
        torch.testing.assert_close(g_got[2:], g_want[2:])  # the finite rows' gradient is untouched
        assert torch.isnan(torch.autograd.grad(got[0] + got[1], z)[0][:2]).all()
    else:
        if path == "fused-kernel-on" and _cpu_kernel._compiler() is None:
            pytest.skip("no C compiler to build the kernel")
        monkeypatch.setenv("XENT_CPU_KERNEL", "1" if path == "fused-kernel-on" else "0")
        hh = h.clone().requires_grad_()
        got = xent.linear_cross_entropy(hh, w, y, reduction="none", chunk_size=2)
        (g_h,) = torch.autograd.grad(got.sum(), hh)
        assert torch.isnan(g_h[:2]).all()  # the NaN rows' gradient is NaN too, not a number
    torch.testing.assert_close(got, want, equal_nan=True)
    for reduction in ("mean", "sum"):
        z = h @ w.T
        assert torch.isnan(xent.cross_entropy(z, y, reduction=reduction))
        assert torch.isnan(F.cross_entropy(z, y, reduction=reduction))


# ---------- sparse distillation: the teacher is read only where the target is valid ----------

@pytest.mark.parametrize("fused,shift", [(False, False), (True, False), (True, True)])  # plain: no shift
def test_sparse_teacher_padding_at_ignored_positions(fused, shift):
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, D, generator=g)
    teacher = torch.log_softmax(torch.randn(2, 5, V, generator=g), -1).topk(3, dim=-1)
    ids, lp = teacher.indices.clone(), teacher.values.clone()
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, 2] = y[1, 4] = -100
    pad = (0, 1) if shift else (0, 2)  # the position whose teacher is never read (shift: t reads y[t+1])
    ids_pad, lp_pad = ids.clone(), lp.clone()
    ids_pad[pad] = -1  # a data pipeline's padding
    lp_pad[pad] = math.nan
    if shift:
        ids_pad[1, 4] = -1  # the last position is never read under shift

    def run(i, p):
        if fused:
            return xent.linear_sparse_distill_loss(h, _W, i, p, y, shift=shift, reduction="none")
        return xent.sparse_distill_loss(x, i, p, y, reduction="none")

    torch.testing.assert_close(run(ids_pad, lp_pad), run(ids, lp), rtol=0, atol=0)
    bad = ids.clone()
    bad[1, 0, 0] = -1  # a valid position: still refused
    with pytest.raises(ValueError, match=r"teacher_ids has 1 id\(s\) outside \[0, 7\) at positions that are "
                                         r"not ignored; the first is -1"):
        run(bad, lp)
