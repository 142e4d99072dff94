"""Errors the loader raises on top of the checkpoint format's own (CheckpointError, CorruptChunkError).

Every error carries a `hint` saying what to do, like the format's errors, so the CLI and the worker
can show it to a user without a traceback.
"""

from __future__ import annotations


class LoaderError(Exception):
    """A load could not be done as asked (bad option, no device, not enough memory).

    Like CheckpointError, `str(exc)` is the message and `exc.hint` what to do; the CLI prints both.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __reduce__(self):  # keep attributes across pickling (worker processes, test workers)
        return (_rebuild, (type(self), self.__dict__, self.args))


def _rebuild(cls, state, args):
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class InsufficientMemoryError(LoaderError):
    """The destination (host RAM or device memory) cannot hold the tensors; raised before any read."""

    def __init__(self, where: str, needed: int, available: int, hint: str | None = None) -> None:
        super().__init__(
            f"not enough {where} to load: need {needed / 2**30:.2f} GiB, {available / 2**30:.2f} GiB available",
            hint or "free memory (unload a model, shrink the DRAM pool) or load onto a bigger device",
        )
        self.where = where
        self.needed = needed
        self.available = available


class ShardPlanError(LoaderError):
    """The tensor-parallel request does not fit a tensor (dimension missing, no piece for this rank)."""
