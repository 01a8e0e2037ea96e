"""SIGINT and SIGTERM as an orderly end: the stage's run ends KILLED, never left RUNNING.

`install` (the CLI calls it) makes both signals raise `Interrupted`, a KeyboardInterrupt, which
`tracking.stage_run` turns into the run's KILLED status. Inside `deferred()` (training) a signal is
only recorded: a Keras callback (`StopOnSignal`) ends the fit after the current batch, so that the
stage can log what it has (the best model so far) before it raises. A second signal while one is
pending raises at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by `signal_name` (SIGINT or SIGTERM)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signal_name, 130)


_state = {"deferring": False, "pending": None}


def install() -> None:
    """Make SIGINT and SIGTERM raise `Interrupted` in this (main) thread."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, _handle)


def _handle(number, frame) -> None:
    error = Interrupted(signal.Signals(number).name)
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = error
        return
    raise error


def pending() -> Interrupted | None:
    """The signal received inside `deferred()` and not yet acted on, if any."""
    return _state["pending"]


@contextmanager
def deferred():
    """Within the block the first signal is recorded (`pending`), not raised."""
    previous = _state["deferring"]
    _state["deferring"] = True
    try:
        yield
    finally:
        _state["deferring"] = previous


def raise_pending() -> None:
    """Raise the recorded signal, if one came, clearing it."""
    error, _state["pending"] = _state["pending"], None
    if error is not None:
        raise error
