"""Errors a user can act on: each message names the file (and chunk) and `hint` says what to do.

The CLI prints `str(exc)` and `exc.hint` on two lines without a traceback
(ember.cli.errors.friendly_errors), so messages must make sense on their own.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """Any problem with a checkpoint or a conversion source that the user can fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __reduce__(self):  # keep .hint across pickling (multiprocessing, test workers)
        return (type(self)._rebuild, (type(self), self.__dict__, self.args))

    @staticmethod
    def _rebuild(cls, state, args):
        exc = cls.__new__(cls)
        Exception.__init__(exc, *args)
        exc.__dict__.update(state)
        return exc


class InvalidIndexError(CheckpointError):
    """ember.json is missing, malformed, from a newer Ember, or violates a format rule."""


class PartitionSizeError(CheckpointError):
    """A partition file is missing, truncated or longer than the index says."""

    def __init__(self, message: str, hint: str | None, *, file: Path) -> None:
        super().__init__(message, hint)
        self.file = file


class CorruptChunkError(CheckpointError):
    """A chunk's checksum does not match the index: the bytes on disk are not what was written."""

    def __init__(
        self, message: str, hint: str | None, *, file: Path, chunk: int, start: int, end: int
    ) -> None:
        super().__init__(message, hint)
        self.file = file
        self.chunk = chunk
        self.start = start
        self.end = end


class SourceError(CheckpointError):
    """The conversion source is missing, of an unknown kind, or unreadable."""


class UnsupportedDtypeError(SourceError):
    """A source tensor has a dtype format v1 cannot store."""


class DestinationExistsError(CheckpointError):
    """The conversion destination exists and the caller did not ask to overwrite it."""
