"""torch.compile never traces into the fused head, and `import xent` does not load dynamo for that.

The graphs dynamo captures are recorded by a backend that returns them unchanged (no inductor, fast).
"""

import subprocess
import sys

import torch

import xent
from xent._compile import compiler_disable


def _captured_ops(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    import warnings

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(fn, backend=backend)(*args)
    torch._dynamo.reset()
    about_the_wrapper = [str(w.message) for w in caught if "_compile.py" in str(w.message)]
    assert about_the_wrapper == []  # e.g. dynamo's warning on tracing through a functools.cache
    return out, graphs


def test_import_does_not_load_dynamo():
    # `@torch.compiler.disable` at import time imported torch._dynamo: ~1 s on top of `import torch`.
    code = ("import sys, xent, xent.parallel, xent.cli; xent.cli.build_parser(); "  # = xent --version
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compiled_caller_runs_the_fused_head_eagerly():
    torch.manual_seed(0)
    h = torch.randn(2, 11, 8, requires_grad=True)
    W = torch.randn(37, 8, requires_grad=True)
    y = torch.randint(0, 37, (2, 11))

    def f(h, W, y):
        return xent.linear_cross_entropy(torch.relu(h), W, y, shift=True) * 2

    out, graphs = _captured_ops(f, h, W, y)
    ops = set().union(*graphs)
    # dynamo captured what is around the call, and nothing of the head (its matmuls would show as mm)
    assert any("relu" in op for op in ops) and any("mul" in op for op in ops)
    assert not any("mm" in op or "nonzero" in op or "logsumexp" in op for op in ops), ops
    out.backward()
    ref = torch.nn.functional.cross_entropy((torch.relu(h.detach()) @ W.detach().T)[:, :-1].reshape(-1, 37),
                                            y[:, 1:].reshape(-1), reduction="mean") * 2
    torch.testing.assert_close(out.detach(), ref)
    assert h.grad is not None and W.grad is not None


def test_compiler_disable_is_transparent_in_eager_mode():
    def scaled(x, *, by):
        """docstring"""
        return torch.mm(x, x) * by

    wrapped = compiler_disable(scaled)
    assert wrapped.__name__ == "scaled" and wrapped.__doc__ == "docstring" and wrapped.__wrapped__ is scaled
    x = torch.randn(3, 3)
    torch.testing.assert_close(wrapped(x, by=2.0), torch.mm(x, x) * 2.0)
    out, graphs = _captured_ops(lambda x: torch.relu(wrapped(x, by=3.0)), x)
    torch.testing.assert_close(out, torch.relu(torch.mm(x, x) * 3.0))
    assert not any("mm" in op for g in graphs for op in g)
