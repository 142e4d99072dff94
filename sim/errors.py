"""Errors the simulator raises for bad input: each message names the setting or line at fault."""

from __future__ import annotations


class SimError(Exception):
    """A simulation cannot run as asked; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SimConfigError(SimError):
    """The configuration file (or a command-line override) is invalid."""


class TraceError(SimError):
    """A CSV trace cannot be read: the message names the file and the line."""
