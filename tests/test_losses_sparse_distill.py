"""Sparse-teacher distillation (top-k ids and log-probs plus a tail bucket) against a float64 loop
reference over explicit buckets; k = V gives the dense distillation; closed form == autograd; fused ==
plain; a tail of tiny mass is formed from the complement, not as 1 − Σ q."""

import math

import pytest
import torch

import xent
from xent.losses._distill import KINDS

V_, D_ = 13, 5


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def ref_sparse(student, ids, log_p, target=None, *, kind="forward_kl", beta=0.5):
    """Per-token loss over explicit buckets, float64 lists; mean over the positions whose target is kept."""
    out = []
    rows = student.detach().double().reshape(-1, student.shape[-1]).tolist()
    ids_l = ids.reshape(-1, ids.shape[-1]).tolist()
    lp_l = log_p.detach().double().reshape(-1, ids.shape[-1]).tolist()
    tg = [0] * len(rows) if target is None else target.reshape(-1).tolist()
    for z, S, lp, y in zip(rows, ids_l, lp_l, tg):
        if y == -100:
            continue
        lse = math.log(sum(math.exp(v) for v in z))
        q = [math.exp(v - lse) for v in z]
        P = [math.exp(v) for v in lp]
        Q = [q[i] for i in S]
        rest = [q[c] for c in range(len(z)) if c not in S]
        if rest:
            P.append(max(0.0, 1.0 - sum(P)))
            Q.append(sum(rest))
        if kind == "forward_kl":
            out.append(_kl(P, Q))
        elif kind == "reverse_kl":
            out.append(_kl(Q, P))
        else:
            M = [beta * p + (1 - beta) * qq for p, qq in zip(P, Q)]
            out.append(beta * _kl(P, M) + (1 - beta) * _kl(Q, M))
    return sum(out) / max(len(out), 1)


def _problem(seed=0, k=4, shape=(3, 7), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D_, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(V_, D_, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V_, generator=g, dtype=dtype).requires_grad_()
    teacher = torch.log_softmax(torch.randn(*shape, V_, generator=g, dtype=torch.float64) * 2, dim=-1)
    top = teacher.topk(k, dim=-1)
    y = torch.randint(0, V_, shape, generator=g)
    y[0, 2] = y[2, :2] = -100
    return h, W, b, top.indices, top.values.to(dtype), y, teacher


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
@pytest.mark.parametrize("k", [1, 4, V_ - 1])
def test_plain_matches_bucket_reference(kind, beta, k):
    h, W, b, ids, lp, y, _ = _problem(k=k)
    x = h @ W.T + b
    got = xent.sparse_distill_loss(x, ids, lp, y, kind=kind, beta=beta)
    assert got.item() == pytest.approx(ref_sparse(x, ids, lp, y, kind=kind, beta=beta), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_v_is_the_dense_distillation(kind):
    h, W, b, ids, lp, y, teacher = _problem(k=V_)
    x = (h @ W.T + b).detach().requires_grad_()
    dense = xent.distill_loss(x, teacher, y, kind=kind, beta=0.3, alpha=0.2)
    sparse = xent.sparse_distill_loss(x, ids, lp, y, kind=kind, beta=0.3, alpha=0.2)
    (g_dense,) = torch.autograd.grad(dense, x)
    (g_sparse,) = torch.autograd.grad(sparse, x)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)
    fused = xent.linear_sparse_distill_loss(h, W, ids, lp, y, kind=kind, beta=0.3, alpha=0.2, student_bias=b,
                                            chunk_size=5)
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5, V_])
def test_closed_form_equals_autograd(kind, k):
    h, W, b, ids, lp, y, _ = _problem(seed=1, k=k)
    loss = xent.losses.SparseDistill(kind=kind, beta=0.3, softcap=3.0)
    z = (h @ W.T + b).detach().reshape(-1, V_)
    i, p = ids.reshape(-1, k), lp.reshape(-1, k)
    zz = z.clone().requires_grad_()
    scale = torch.rand(z.shape[0], dtype=torch.float64)
    expected = loss(zz, torch.zeros(z.shape[0], dtype=torch.long), i, p)
    (g_ref,) = torch.autograd.grad(expected, zz, scale)
    value, grad = loss.value_and_grad(z.clone(), torch.zeros(z.shape[0], dtype=torch.long), scale, i, p)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_plain(chunk_size, reduction):
    h, W, b, ids, lp, y, _ = _problem(seed=2, k=3)
    tw = torch.rand(y.shape, dtype=torch.float64)
    fused = xent.linear_sparse_distill_loss(h, W, ids, lp, y, kind="jsd", beta=0.4, student_bias=b,
                                            shift=True, chunk_size=chunk_size, reduction=reduction,
                                            token_weights=tw)
    plain = xent.sparse_distill_loss((h @ W.T + b)[:, :-1], ids[:, :-1], lp[:, :-1], y[:, 1:], kind="jsd",
                                     beta=0.4, reduction=reduction, token_weights=tw[:, 1:])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    up = torch.rand(fused.shape, dtype=torch.float64) if fused.dim() else None
    for a, c in zip(torch.autograd.grad(fused, (h, W, b), up), torch.autograd.grad(plain, (h, W, b), up)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_a_tail_of_tiny_mass_is_exact_in_float32():
    """The top-k hold all but ~1e-10 of the student's mass: q_tail from the complement's own sum, so the
    float32 loss matches float64 (1 − Σ q_S in float32 would be 0, and forward KL infinite)."""
    k = 4
    z = torch.zeros(2, V_)
    z[:, k:] = -30.0
    ids = torch.arange(k).expand(2, k)
    lp = torch.log(torch.tensor([0.3, 0.3, 0.2, 0.1])).expand(2, k)  # p_tail = 0.1
    got = xent.sparse_distill_loss(z, ids, lp)
    ref = ref_sparse(z.double(), ids, lp.double())
    assert math.isfinite(got.item()) and got.item() == pytest.approx(ref, rel=1e-6)
    fused = xent.linear_sparse_distill_loss(torch.eye(2), z.T.contiguous(), ids, lp)  # h @ W.T = z
    assert fused.item() == pytest.approx(ref, rel=1e-6)


def test_bad_teacher_is_refused():
    z = torch.randn(2, 5)
    ids = torch.tensor([[0, 1], [2, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3]]))
    with pytest.raises(ValueError, match="teacher_ids repeats an id at 1 position"):
        xent.sparse_distill_loss(z, ids, lp)
    with pytest.raises(ValueError, match="more than probability 1"):
        xent.sparse_distill_loss(z, torch.tensor([[0, 1], [2, 3]]),
                                 torch.log(torch.tensor([[0.9, 0.5], [0.1, 0.1]])))
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        xent.sparse_distill_loss(z, torch.tensor([[0, 5], [2, 3]]), lp)
    with pytest.raises(ValueError, match="teacher_log_probs shape"):
        xent.sparse_distill_loss(z, torch.tensor([[0, 1], [2, 3]]), lp[:, :1])
