"""Integrations with other libraries, each imported on first use: ``xent.integrations.transformers``
(:func:`~xent.integrations.transformers.patch_causal_lm`, :func:`~xent.integrations.transformers.unpatch`)
and ``xent.integrations.trl`` (:class:`~xent.integrations.trl.XentSFTTrainer`,
:class:`~xent.integrations.trl.XentGRPOTrainer`)."""

_SUBMODULES = ("transformers", "trl")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'xent.integrations' has no attribute {name!r}")
