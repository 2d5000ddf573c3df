"""PyTorch ↔ JAX weight conversion: `load_whisper`, `load_clip_text` (import) and the exporter's name maps."""

from __future__ import annotations

import importlib

_EXPORTS = {"load_whisper": "wavlink_jax.convert.whisper", "load_clip_text": "wavlink_jax.convert.clip_text"}


def __getattr__(name: str):
    # Lazy, so importing one converter does not pull in (or require) the other.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
