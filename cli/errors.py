"""How the CLI turns an exception into two lines a user can act on.

Library code raises errors whose message says what went wrong and what to do. The CLI prints
them without a traceback and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, highlight=False)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes whose messages are meant for users.

    Imported lazily so that a command never pays for packages it does not use.
    """
    from ember.ckpt_format.errors import CheckpointError
    from ember.loader.errors import LoaderError

    return (CheckpointError, LoaderError, FileNotFoundError, PermissionError)


def exit_with(message: str, hint: str | None = None, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    if hint:
        err_console.print(f"[dim]hint:[/] {hint}")
    raise SystemExit(code)


def friendly_errors(fn: F) -> F:
    """Decorator for command functions: user-facing errors become 'error: …' + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)
        except user_error_types() as exc:  # noqa: B030 - computed tuple of classes
            hint = getattr(exc, "hint", None)
            exit_with(str(exc), hint)

    return wrapper  # type: ignore[return-value]
