"""Progress of long operations: a live bar on a terminal, a few plain lines anywhere else.

A bar redrawn in place is what a person at a terminal wants; in a log file or a pipe it would be
noise (or nothing at all), so there each new phase prints one line instead.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class PercentProgress:
    """A 0-100 % task with a changing message (cold starts: "load from disk on local-0").

    Nothing shows until the first update (a warm request has no load to show), and finish()
    clears the bar before other output (the tokens) takes the terminal.
    """

    def __init__(self, console: Console, description: str) -> None:
        self.console = console
        self.description = description
        self._last_message: str | None = None
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> PercentProgress:
        return self

    def update(self, percent: float, message: str) -> None:
        if not self.console.is_terminal:
            if message != self._last_message:
                self.console.print(f"{self.description}: {percent:.0f}% ({message})", highlight=False,
                                   soft_wrap=True)
        else:
            if self._bar is None:
                self._bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                     TaskProgressColumn(), TextColumn("{task.fields[message]}"), TimeElapsedColumn(),
                                     console=self.console, transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self.description, total=100, message="")
            self._bar.update(self._task, completed=percent, message=message)
        self._last_message = message

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish()


def bytes_progress(console: Console) -> Progress:
    """Bytes done / total with speed and time left (downloads, uploads, conversions)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
