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
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, highlight=False)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes whose messages are meant for users.

    Imported lazily so that a command never pays for packages it does not use.
    """
    from ember.api.client import ApiError
    from ember.ckpt_format.errors import CheckpointError
    from ember.controller.errors import ConfigError as ControllerConfigError
    from ember.controller.state import StoreUnavailable
    from ember.loader.errors import LoaderError
    from ember.sim.errors import SimError
    from ember.worker.memory import DeviceUnavailable
    from ember.worker.config import WorkerConfigError

    return (
        ApiError, ControllerConfigError, StoreUnavailable, CheckpointError, LoaderError, WorkerConfigError,
        DeviceUnavailable, SimError, FileNotFoundError, PermissionError,
    )


def exit_with(message: str, hint: str | None = None, code: int = 1) -> None:
    """Print what went wrong and what to do (soft-wrapped: each stays one line), then exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}", soft_wrap=True)
    raise SystemExit(code)


def default_hint(exc: BaseException) -> str | None:
    """What to do about a controller's refusal that came without advice of its own."""
    from ember.api.client import ApiError

    if not isinstance(exc, ApiError):
        return None
    # An error inside a stream that had started (an SSE error event) has no HTTP status: its code says.
    status = exc.status or {"queue_full": 429, "model_not_found": 404, "not_found": 404, "unavailable": 503,
                            "worker_error": 502, "internal": 500}.get(exc.code or "", 0)
    if status == 403 and exc.code != "forbidden":
        return None  # refused for a reason of its own (e.g. a checkpoint outside the allowed roots): the message says
    if status == 429:
        wait = f"in {exc.retry_after_s:g} s" if exc.retry_after_s else "shortly"
        return f"the deployment's queue is full: retry {wait}, or raise its --queue-limit / --max"
    return {
        400: "check the command's arguments (`ember COMMAND --help`)",
        401: "set EMBER_API_KEY to the controller's API key",
        403: "use a key with the needed scope (an admin key for deployments, nodes and listings)",
        404: "`ember list` shows the deployments, `ember status` the nodes and instances",
        409: "pick another name, or `ember delete NAME` first",
        422: "check the command's arguments (`ember COMMAND --help`)",
        502: "a worker failed the request: `ember status` shows the nodes; see that worker's log",
        503: "`ember status` shows whether nodes are up and each deployment's last error",
    }.get(status, "see the controller's log" if status >= 500 else None)


def friendly_errors(fn: F) -> F:
    """Decorator for command functions: user-facing errors become 'error: …' + 'hint: …' + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)
        except user_error_types() as exc:  # noqa: B030 - computed tuple of classes
            hint = getattr(exc, "hint", None) or default_hint(exc)
            exit_with(str(exc), hint)

    return wrapper  # type: ignore[return-value]
