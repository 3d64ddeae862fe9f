"""Stop requests at step boundaries: SIGTERM (Cloud TPU / SLURM preemption) and Ctrl-C.

The handler only sets a flag; the trainer looks at it after each step, saves a checkpoint and
exits cleanly. A second Ctrl-C aborts at once (the last complete checkpoint stays restorable).
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopRequest"]


class StopRequest:
    """While active (a context manager), SIGTERM and SIGINT set `self.signal_name`."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            # Second Ctrl-C: the user wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nstopping after this step with a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread (a library user may run
        # the trainer elsewhere; then SIGTERM keeps its default meaning).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
