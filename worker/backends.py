"""Inference backends by name, as deployments and the agent's Load call name them."""

from __future__ import annotations

from typing import Any

from ember.worker.backend import Backend, BackendError
from ember.worker.transformers_backend import TransformersBackend

BACKENDS: dict[str, type[Backend]] = {"transformers": TransformersBackend}


def make_backend(name: str, **options: Any) -> Backend:
    """A fresh, unloaded backend; `options` go to its constructor (e.g. max_batch_size)."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r}; this worker has: {', '.join(sorted(BACKENDS))}",
            hint="deploy with --backend set to one of those",
        ) from None
    return cls(**options)
