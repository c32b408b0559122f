"""``torch.compiler.disable`` applied when it matters, so that ``import xent`` does not import dynamo.

``@torch.compiler.disable`` imports ``torch._dynamo`` when it decorates: about a second, as long as
``import torch`` itself, paid by every ``import xent`` and ``xent --version``. :func:`compiler_disable`
gives the same behaviour without that cost. Its wrapper calls the function directly, except while
torch.compile traces it (dynamo is loaded then anyway): there it calls ``torch.compiler.disable(fn)``,
so dynamo breaks the graph at the call and runs the function eagerly with compilation off for everything
it calls, as the decorator does. Measured with ``torch._dynamo.utils.counters`` on a compiled module that
calls ``xent.linear_cross_entropy``: the same graphs and captured calls as the decorator, no
recompilation on later calls; the first compilation traces a few more frames (the ``disable`` call
itself). The disabled function is made again at each compiled call (~15 µs), not cached: a cache read
under tracing would be guarded (a recompilation once it fills) or warned about (``functools.cache``).
"""

from __future__ import annotations

import functools

import torch


def compiler_disable(fn):
    """``fn`` that torch.compile never traces into, without importing dynamo before it compiles."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # dynamo is tracing this call: it is loaded already
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
