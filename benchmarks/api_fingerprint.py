"""SHA-256 fingerprints of every public loss function's values and gradients, to show that a refactor
changed no bit.

A fixed set of calls (every public function of ``xent`` and ``xent.parallel``; float32 and bfloat16 on
the CPU; the compiled CPU kernel on and off, ``XENT_CPU_KERNEL=1`` / ``0``) is run, and the bytes of
each result and of each input gradient are hashed. Run it at two commits and compare the files::

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old/src python benchmarks/api_fingerprint.py --out /tmp/old.txt
    PYTHONPATH=src python benchmarks/api_fingerprint.py --out /tmp/new.txt
    diff /tmp/old.txt /tmp/new.txt && echo identical

The calls use spellings both commits accept: the head weight positionally, and keyword names mapped by
:func:`call` to whichever spelling the function's signature has (``weight_classes`` / ``weight``,
``bias`` / ``linear_bias``, ``weights`` / ``stream_weights``). One thread, fixed seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import xent
import xent.parallel

#: Old spelling -> new spelling; the call uses the new one where the function's signature has it.
RENAMES = {"weight_classes": "weight", "bias": "linear_bias", "weights": "stream_weights"}


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with each old keyword renamed when ``fn`` takes the new name instead."""
    params = inspect.signature(fn).parameters
    fixed = {}
    for key, value in kwargs.items():
        new = RENAMES.get(key)
        if key not in params and new in params:
            key = new
        fixed[key] = value
    return fn(*args, **fixed)


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _inputs(dtype, seed=0, N=(2, 24), D=32, V=300):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, V, N, generator=g)
    y[0, 3] = y[1, 7] = y[1, 8] = -100
    wc = torch.rand(V, generator=g) + 0.5
    tw = torch.rand(*N, generator=g)
    tw[0, 5] = 0.0
    logits = (torch.randn(*N, V, generator=g) * 2).to(dtype)
    return h, W, b, y, wc, tw, logits


def _run(name, fn, grads_of, reduce=None):
    """(value hash, gradient hash) of fn() and of d(Σ value·r)/d inputs, r a fixed pseudo-random weight."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o for o in outs if isinstance(o, torch.Tensor))
    diff = [o for o in outs if o.requires_grad]
    grads = ()
    if diff:
        g = torch.Generator().manual_seed(7)
        total = sum((o.float() * torch.rand(o.shape, generator=g)).sum() for o in diff)
        wrt = [x for x in grads_of if x is not None and x.requires_grad]
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return f"{name} {digest(*outs)} {digest(*grads)}"


def cases(dtype):
    h0, W0, b0, y, wc, tw, logits0 = _inputs(dtype)
    hs = _inputs(dtype, seed=1)[0]
    H = lambda: _leaf(h0)  # noqa: E731
    out = []

    def fused(name, fn, *extra_leaves):
        h, W, b = H(), _leaf(W0), _leaf(b0)
        leaves = [_leaf(x) for x in extra_leaves]
        out.append(_run(name, lambda: fn(h, W, b, *leaves), [h, W, b, *leaves]))

    def plain(name, fn):
        z = _leaf(logits0)
        out.append(_run(name, lambda: fn(z), [z]))

    for red in ("mean", "sum", "none"):
        for chunk in ("auto", 16):
            fused(
                f"linear_cross_entropy/{red}/{chunk}",
                lambda h, W, b, red=red, chunk=chunk: call(
                    xent.linear_cross_entropy, h, W, y, reduction=red, chunk_size=chunk
                ),
            )
            fused(
                f"linear_cross_entropy+bias+wc+z/{red}/{chunk}",
                lambda h, W, b, red=red, chunk=chunk: call(
                    xent.linear_cross_entropy,
                    h,
                    W,
                    y,
                    bias=b,
                    weight_classes=wc,
                    z_loss=1e-3,
                    reduction=red,
                    chunk_size=chunk,
                    shift=True,
                ),
            )
            fused(
                f"linear_cross_entropy+wc+z+tw/{red}/{chunk}",
                lambda h, W, b, red=red, chunk=chunk: call(
                    xent.linear_cross_entropy,
                    h,
                    W,
                    y,
                    weight_classes=wc,
                    z_loss=1e-3,
                    token_weights=tw,
                    reduction=red,
                    chunk_size=chunk,
                ),
            )
            fused(
                f"linear_cross_entropy+ls+cap/{red}/{chunk}",
                lambda h, W, b, red=red, chunk=chunk: call(
                    xent.linear_cross_entropy,
                    h,
                    W,
                    y,
                    label_smoothing=0.1,
                    softcap=5.0,
                    reduction=red,
                    chunk_size=chunk,
                    num_items=50 if red == "mean" else None,
                ),
            )
    fused(
        "linear_cross_entropy/stats",
        lambda h, W, b: call(
            xent.linear_cross_entropy, h, W, y, z_loss=1e-3, return_stats=True, chunk_size=16
        )[0],
    )
    fused(
        "linear_cross_entropy/stats-values",
        lambda h, W, b: torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64)
                for v in vars(
                    call(xent.linear_cross_entropy, h, W, y, return_stats=True, chunk_size=16)[1]
                ).values()
                if isinstance(v, (torch.Tensor, float, int))
            ]
        ),
    )
    if dtype != torch.float32:
        fused(
            "linear_cross_entropy/fp32proj",
            lambda h, W, b: call(
                xent.linear_cross_entropy, h, W, y, bias=b, projection_dtype=torch.float32, chunk_size=16
            ),
        )
    for loss in (
        xent.losses.Focal(gamma=2.0),
        xent.losses.EntropyRegularized(beta=0.1),
        xent.losses.CrossEntropy(label_smoothing=0.05),
    ):
        for red in ("mean", "none"):
            fused(
                f"linear_loss/{type(loss).__name__}/{red}",
                lambda h, W, b, loss=loss, red=red: call(
                    xent.linear_loss,
                    h,
                    W,
                    y,
                    loss=loss,
                    bias=b,
                    reduction=red,
                    chunk_size=16,
                    token_weights=tw,
                ),
            )
    for ent in (False, True):
        fused(
            f"linear_log_probs/{ent}",
            lambda h, W, b, ent=ent: call(
                xent.linear_log_probs,
                h,
                W,
                y,
                bias=b,
                with_entropy=ent,
                temperature=0.7,
                shift=True,
                chunk_size=16,
            ),
        )
    fused(
        "linear_distill_loss",
        lambda h, W, b: call(
            xent.linear_distill_loss, h, W, hs, W0 * 0.9, y, hard_weight=0.3, student_bias=b, chunk_size=16
        ),
    )
    k = 4
    tids = torch.topk(logits0.float(), k, dim=-1).indices
    tlp = torch.log_softmax(logits0.float(), dim=-1).gather(-1, tids)
    fused(
        "linear_sparse_distill_loss",
        lambda h, W, b: call(xent.linear_sparse_distill_loss, h, W, tids, tlp, y, chunk_size=16),
    )
    ref = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) * 5
    fused(
        "linear_rho1_loss/ref_losses",
        lambda h, W, b: call(
            xent.linear_rho1_loss, h, W, y, ref_losses=ref, bias=b, chunk_size=16, token_weights=tw
        ),
    )
    fused(
        "linear_rho1_loss/ref_head",
        lambda h, W, b: call(
            xent.linear_rho1_loss, h, W, y, ref_hidden=hs, ref_weight=W0 * 0.9, shift=True, chunk_size=16
        ),
    )
    streams = torch.stack([h0, hs])
    fused(
        "linear_multi_token_loss",
        lambda h, W, b, s: call(
            xent.linear_multi_token_loss, s, W, y, weights=[1.0, 0.3], bias=b, chunk_size=16
        ),
        streams,
    )
    # plain functions on materialised logits
    plain(
        "cross_entropy", lambda z: call(xent.cross_entropy, z, y, weight=wc, label_smoothing=0.1, z_loss=1e-3)
    )
    plain(
        "cross_entropy/tw/none", lambda z: call(xent.cross_entropy, z, y, token_weights=tw, reduction="none")
    )
    plain("causal_lm_loss", lambda z: call(xent.causal_lm_loss, z, y, num_items_in_batch=30, softcap=5.0))
    # binary_cross_entropy takes probabilities, as torch's; the logits form is its own function
    plain("binary_cross_entropy",
          lambda z: call(xent.binary_cross_entropy, torch.sigmoid(z), (z.detach() > 0).float()))
    plain("binary_cross_entropy_with_logits",
          lambda z: call(xent.binary_cross_entropy_with_logits, z, (z.detach() > 0).float()))
    plain("dft_loss", lambda z: call(xent.dft_loss, z, y))
    plain("distill_loss", lambda z: call(xent.distill_loss, z, logits0 * 0.5, y, kind="jsd", hard_weight=0.2))
    plain("eaft_loss", lambda z: call(xent.eaft_loss, z, y))
    emb = torch.randn(logits0.shape[-1], 8, generator=torch.Generator().manual_seed(5))
    plain("emo_loss", lambda z: call(xent.emo_loss, z, y, cost_embedding=emb))
    plain("entropy_regularized_loss", lambda z: call(xent.entropy_regularized_loss, z, y, beta=0.1))
    plain("focal_loss", lambda z: call(xent.focal_loss, z, y, gamma=2.0))
    plain("poly_loss", lambda z: call(xent.poly_loss, z, y))
    plain("gold_loss", lambda z: call(xent.gold_loss, z, y))
    plain("tailr_loss", lambda z: call(xent.tailr_loss, z, y, gamma=0.5))
    plain("log_probs", lambda z: call(xent.log_probs, z, y, with_entropy=True, shift=True))
    plain("rho1_loss", lambda z: call(xent.rho1_loss, z, y, ref))
    plain("sparse_distill_loss", lambda z: call(xent.sparse_distill_loss, z, tids, tlp, y))
    plain(
        "multi_token_loss",
        lambda z: call(xent.multi_token_loss, torch.stack([z, z * 0.5]), y, weights=[1.0, 0.2]),
    )
    out.append(f"count_items {digest(xent.count_items(y))}")
    # vocabulary-parallel, a world of one
    plain(
        "vocab_parallel_cross_entropy",
        lambda z: call(
            xent.parallel.vocab_parallel_cross_entropy, z, y, weight=wc, label_smoothing=0.1, z_loss=1e-3
        ),
    )
    for red in ("mean", "none"):
        fused(
            f"vocab_parallel_linear_cross_entropy/{red}",
            lambda h, W, b, red=red: call(
                xent.parallel.vocab_parallel_linear_cross_entropy,
                h,
                W,
                y,
                local_bias=b,
                weight_classes=wc,
                label_smoothing=0.1,
                softcap=5.0,
                reduction=red,
                chunk_size=16,
                token_weights=tw,
            ),
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    lines = []
    try:
        for kernel in ("1", "0"):
            os.environ["XENT_CPU_KERNEL"] = kernel
            for dtype in (torch.float32, torch.bfloat16):
                lines += [f"kernel={kernel} {dtype} {line}" for line in cases(dtype)]
    finally:
        dist.destroy_process_group()
    total = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    lines.append(f"total {total}")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(f"{len(lines) - 1} calls, total {total}\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
