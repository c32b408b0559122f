"""What each rank runs for tests/parallel/test_data_parallel.py: a tiny GPT-2 (built from a config,
float64, no dropout) trained one step on 2 ranks × 2 micro-batches, with DDP and with FSDP2, against the
same model run by one process on the whole batch."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_launch import each_case

import xent

MICRO_BATCHES = 2
CASES = ["ddp", "ddp_per_microbatch_mean_differs", "fsdp2"]


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)  # the same initial weights on every rank
    return GPT2LMHeadModel(config).double()


def _batch(world):
    """The global batch [world·MICRO_BATCHES·2, 9], padding (-100 labels) uneven across micro-batches
    and ranks, and its split: batches[rank][micro] = (input_ids [2, 9], labels [2, 9])."""
    g = torch.Generator().manual_seed(1)
    n = world * MICRO_BATCHES * 2
    ids = torch.randint(0, 40, (n, 9), generator=g)
    labels = ids.clone()
    keep = torch.randint(2, 10, (n,), generator=g)  # tokens kept per sequence: 2..9
    labels[torch.arange(9) >= keep.unsqueeze(1)] = -100
    pairs = list(zip(ids.split(2), labels.split(2)))
    return ids, labels, [pairs[r * MICRO_BATCHES:(r + 1) * MICRO_BATCHES] for r in range(world)]


def _loss(model, ids, labels, num_items=None):
    return xent.causal_lm_loss(model(input_ids=ids).logits, labels, num_items_in_batch=num_items)


def _reference_grads(world):
    """One process, the whole batch, torch's mean over every next-token target."""
    model = _model()
    ids, labels, _ = _batch(world)
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _step(model, micro_batches, world, *, no_sync, per_microbatch_mean=False):
    """The recipe: num_items = the count over every micro-batch and rank; each micro-batch loss is
    Σℓ / num_items; times world size because DDP/FSDP average the gradients over ranks."""
    num_items = sum(xent.count_items(labels, group=dist.group.WORLD) for _, labels in micro_batches)
    for i, (ids, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else no_sync():
            if per_microbatch_mean:  # the late-2024 transformers bug: a mean of means
                loss = _loss(model, ids, labels) / len(micro_batches)
            else:
                loss = _loss(model, ids, labels, num_items) * world
            loss.backward()


def check_ddp(rank, world, per_microbatch_mean=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    want = _reference_grads(world)
    model = _model()
    ddp = DDP(model)
    _step(ddp, _batch(world)[2][rank], world, no_sync=ddp.no_sync, per_microbatch_mean=per_microbatch_mean)
    got = {n: p.grad for n, p in model.named_parameters()}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def check_ddp_per_microbatch_mean_differs(rank, world):
    """The test above can fail: averaging per-micro-batch means gives another gradient."""
    try:
        check_ddp(rank, world, per_microbatch_mean=True)
    except AssertionError:
        return
    raise AssertionError("a mean of per-micro-batch means matched the full-batch gradient")


def check_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    want = _reference_grads(world)
    model = _model()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the root: embeddings, the tied LM head, the final norm

    class _NoSync:  # FSDP2's switch for gradient accumulation without communication
        def __enter__(self):
            model.set_requires_gradient_sync(False)

        def __exit__(self, *exc):
            model.set_requires_gradient_sync(True)

    _step(model, _batch(world)[2][rank], world, no_sync=_NoSync)
    for n, p in model.named_parameters():
        full = p.grad.full_tensor()  # a DTensor sharded over the ranks: gather to compare
        torch.testing.assert_close(full, want[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def training_worker(rank, world, names):
    return each_case(names, lambda name: globals()[f"check_{name}"](rank, world))
