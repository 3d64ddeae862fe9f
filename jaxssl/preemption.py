"""Stop requests: SIGTERM (Cloud TPU / SLURM preemption) and Ctrl-C.

Once training steps run, the handler only sets a flag; the trainer looks at it after each step
(and between the batches of an evaluation), saves a checkpoint and exits cleanly. A second
Ctrl-C aborts at once (the last complete checkpoint stays restorable).

Before the first step of a run (start-up, restoring, the kNN at initialisation, compiling the
step) there is nothing to save, and a Python signal handler would not even run until a long
C++ call (XLA compiling a ResNet-50 takes minutes) returns. While `immediate` is set, a SIGTERM
is therefore taken by a watcher thread woken through `signal.set_wakeup_fd` the moment the
signal lands: it runs the `on_immediate_exit` callbacks (release the workdir lock, say why) and
ends the process with status 0, as a preempted run that saved would. Ctrl-C in that phase raises
KeyboardInterrupt (in a notebook it must not end the kernel).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Callable

__all__ = ["StopRequest"]


class StopRequest:
    """While active (a context manager), SIGTERM and SIGINT set `self.signal_name`; while
    `immediate` is also set, SIGTERM ends the process at once (see the module docstring)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.immediate = False
        self.on_immediate_exit: list[Callable[[str], None]] = []
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup = -1

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and (self.signal_name == "SIGINT" or self.immediate):
            # Second Ctrl-C, or one before any step: the user wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nstopping after this step with a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data and self.immediate:
                for callback in self.on_immediate_exit:
                    try:
                        callback("SIGTERM")
                    except Exception:  # best effort: the exit must happen
                        pass
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(0)

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread (a library user may run
        # the trainer elsewhere; then SIGTERM keeps its default meaning).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(),
                                                         warn_on_full_buffer=False)
            self._wakeup = (reader, writer)
            threading.Thread(target=self._watch, args=(reader,), daemon=True,
                             name="jaxssl-stop-watcher").start()
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            reader, writer = self._wakeup
            try:
                reader.shutdown(socket.SHUT_RDWR)  # the watcher's recv returns b"": it ends
            except OSError:
                pass
            reader.close()
            writer.close()
            self._wakeup = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
