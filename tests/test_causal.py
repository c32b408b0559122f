"""xent.causal_lm_loss against transformers' ForCausalLMLoss and a hand-shifted float64 reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

import xent
from reference import ref_causal


def _batch(B=3, T=9, V=17, seed=0, ignore_frac=0.25, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_num_items", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 5), (3, 9, 17), (2, 33, 101)])
def test_matches_transformers(shape, with_num_items, dtype, device):
    logits, labels = _batch(*shape, dtype=dtype)
    logits, labels = logits.to(device), labels.to(device)
    n = torch.tensor(50, device=device) if with_num_items else None
    ours = xent.causal_lm_loss(logits, labels, num_items_in_batch=n)
    theirs = ForCausalLMLoss(logits, labels, shape[-1], num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_gradient_matches_transformers(device):
    logits, labels = _batch(2, 12, 31, seed=1)
    logits, labels = logits.to(device), labels.to(device)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    xent.causal_lm_loss(a, labels).backward()
    ForCausalLMLoss(b, labels, 31).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)


def test_shift_labels_match_transformers():
    logits, labels = _batch(2, 10, 13, seed=2)
    shift = torch.roll(labels, -1, dims=1)
    shift[:, -1] = -100
    for n in (None, torch.tensor(7)):
        ours = xent.causal_lm_loss(logits, None, shift_labels=shift, num_items_in_batch=n)
        theirs = ForCausalLMLoss(logits, None, 13, num_items_in_batch=n, shift_labels=shift)
        torch.testing.assert_close(ours, theirs)
    # shift_labels built from labels give the same loss as the internal shift
    torch.testing.assert_close(xent.causal_lm_loss(logits, None, shift_labels=shift),
                               xent.causal_lm_loss(logits, labels))


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_hand_shifted_reference(opts, reduction):
    logits, labels = _batch(3, 8, 11, seed=3)
    ours = xent.causal_lm_loss(logits.double(), labels, reduction=reduction, **opts)
    ref = ref_causal(logits, labels, reduction=reduction, **opts)
    if reduction == "none":
        assert ours.shape == (3, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_packed_sequences_do_not_cross_documents():
    logits, labels = _batch(2, 12, 19, seed=4, ignore_frac=0.0)
    # row 0: documents of length 5, 4, 3; row 1: one document
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], list(range(12))])
    ours = xent.causal_lm_loss(logits.double(), labels, position_ids=position_ids, reduction="none")
    ref = ref_causal(logits, labels, position_ids=position_ids, reduction="none")
    torch.testing.assert_close(ours, ref)
    # the targets at document starts (positions 5 and 9 of row 0) are not scored
    assert ours[0, 4] == 0 and ours[0, 8] == 0 and (ours[0, [0, 1, 2, 3, 5, 6, 7, 9, 10]] > 0).all()
    # equals scoring each document separately
    docs = [(0, 0, 5), (0, 5, 9), (0, 9, 12), (1, 0, 12)]
    total = sum(xent.causal_lm_loss(logits[b : b + 1, s:e], labels[b : b + 1, s:e], reduction="sum")
                for b, s, e in docs)
    torch.testing.assert_close(xent.causal_lm_loss(logits, labels, position_ids=position_ids,
                                                   reduction="sum"), total)
    assert int(xent.count_items(labels, position_ids=position_ids)) == 4 + 3 + 2 + 11


def test_packed_with_shift_labels():
    logits, labels = _batch(1, 10, 7, seed=5, ignore_frac=0.0)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    shift = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    torch.testing.assert_close(
        xent.causal_lm_loss(logits, None, shift_labels=shift, position_ids=position_ids),
        xent.causal_lm_loss(logits, labels, position_ids=position_ids),
    )


class _CopyRecorder(TorchDispatchMode):
    """Records the size of every tensor produced by a copying op (clone, cat, pad, contiguous...)."""

    COPIES = {"clone", "cat", "constant_pad_nd", "_to_copy", "copy_", "index_select", "index"}

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.COPIES and isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


def test_shift_does_not_copy_logits():
    B, T, V = 2, 16, 50
    logits, labels = _batch(B, T, V, seed=6)
    logits.requires_grad_(True)
    with _CopyRecorder() as rec:
        loss = xent.causal_lm_loss(logits, labels)
    assert rec.sizes and max(rec.sizes) < B * (T - 1) * V, rec.sizes
    # positive control: flattening the sliced logits, the usual way, is a copy the recorder sees
    with _CopyRecorder() as rec_naive:
        logits[:, :-1].reshape(-1, V)
    assert max(rec_naive.sizes) >= B * (T - 1) * V
    loss.backward()


def test_count_items():
    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, -100]])
    assert xent.count_items(labels).dtype == torch.int64
    assert int(xent.count_items(labels)) == 4  # labels[:, 1:]: [2, -100, 3], [4, 5, -100]
    assert int(xent.count_items(labels, shift=False)) == 5
    assert int(xent.count_items(labels, ignore_index=5, shift=False)) == 7  # -100 counts here
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        xent.count_items(labels.float())


def test_module():
    logits, labels = _batch(2, 6, 9, seed=7)
    mod = xent.nn.CausalLMLoss(label_smoothing=0.1)
    torch.testing.assert_close(mod(logits, labels), xent.causal_lm_loss(logits, labels, label_smoothing=0.1))
    with pytest.raises(TypeError, match="unknown option 'num_items_in_batch'"):
        xent.nn.CausalLMLoss(num_items_in_batch=3)


def test_bad_input():
    logits, labels = _batch(2, 6, 9)
    with pytest.raises(ValueError, match=r"labels shape \(2, 5\) does not match logits shape"):
        xent.causal_lm_loss(logits, labels[:, :5])
    with pytest.raises(ValueError, match=r"position_ids shape \(2, 5\) must equal labels shape \(2, 6\)"):
        xent.causal_lm_loss(logits, labels, position_ids=torch.zeros(2, 5, dtype=torch.long))
    bad = labels.clone()
    bad[1, 3] = 9
    with pytest.raises(ValueError, match=r"the first is 9"):
        xent.causal_lm_loss(logits, bad)
