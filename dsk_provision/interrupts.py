"""SIGINT, SIGTERM and SIGHUP as an exception the code can clean up after.

Python turns SIGINT into KeyboardInterrupt, but SIGTERM (``kill``, a scheduler ending a
job) and SIGHUP (a closed terminal or ssh session) end the process at once, leaving
whatever it started running. Inside ``InterruptGuard`` all three raise
:class:`~dsk_provision.errors.Interrupted` in the main thread instead, whose exit code is
128 + the signal's number. Code that must not be cut short (starting a process and
recording it, stopping the job) runs inside ``guard.held()``: a signal that arrives there
is remembered and raised when the block ends, unless the block is already ending with an
exception (cleanup after the first signal is not interrupted by a second one).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from dsk_provision.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InterruptGuard:
    """A context manager; outside the main thread it does nothing (Python delivers
    signals to the main thread only, and only it may install handlers)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._held = 0
        self._previous: dict[int, object] = {}

    # -- the handler runs in the main thread, between two bytecodes
    def _handle(self, signum, _frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self._held == 0 and first:
            raise Interrupted(signum)

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Signals wait until the block ends; then the first one raises, if the block
        ended normally and none was raised before."""
        self._held += 1
        pending_before = self.received
        try:
            yield
        finally:
            self._held -= 1
        if self._held == 0 and pending_before is None and self.received is not None:
            raise Interrupted(self.received)


__all__ = ["SIGNALS", "InterruptGuard"]
