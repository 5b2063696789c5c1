"""Ctrl-C and SIGTERM during training: the first one stops the run after the current step (the
loop then saves ``last.pt``), a second one interrupts at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "StopRequest"]

#: the signals that stop a run after the current step, and the stop_reason each gives
STOP_SIGNALS = {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "SIGTERM"}


class StopRequest:
    """While active (main thread only), the first SIGINT or SIGTERM asks the loop to stop after the
    current step (it then saves last.pt); a second one interrupts at once (KeyboardInterrupt). The
    previous handlers are restored on exit; a signal that came after the last step (so did not stop
    the run) is then raised again, so it is never lost."""

    def __init__(self) -> None:
        self.signal = ""  # the name of the first signal received
        self.handled = False  # set once the loop has stopped for it
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has come."""
        return bool(self.signal)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        installed, self._previous = self._previous, {}
        if installed and exc_type is None and self.signal and not self.handled:
            signal.raise_signal(getattr(signal, self.signal))
