"""One training run per workdir: `jaxssl.lock`, taken by process 0 before it reads or writes
anything else there, released when the run ends (done, preempted or failed).

Two runs in one workdir overwrite each other's checkpoints (orbax's clean-up of unfinished step
directories can delete the other run's checkpoint as it is being written) and truncate each
other's metrics. The second run is refused with one line naming the first.

- A local workdir (any POSIX filesystem, NFS included) is locked with `fcntl.flock` on the lock
  file: the kernel releases it when the process dies however it dies (kill -9, out of memory),
  so a crashed run never leaves a lock behind. The file stays; it names the last holder.
- An object store (gs://, s3://) has no locks: the holder writes the object with a random token
  and rewrites it every `heartbeat_s` seconds. A lock whose heartbeat is older than `stale_s` is
  a crashed run's and is taken over, with a note. Two runs starting together both write, wait
  `settle_s` and read back: only the one whose token is there goes on (the last write wins).
  A holder that finds another token at its next heartbeat (it was suspended past `stale_s` and
  another run took over) marks the lock `lost`; the trainer then stops without saving.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time

from jaxssl import files
from jaxssl.configuration import ConfigError

__all__ = ["LOCK_NAME", "WorkdirLock"]

LOCK_NAME = "jaxssl.lock"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class WorkdirLock:
    """`acquire()` returns a note to print (a stale lock taken over) or None; ConfigError (one
    line) when another live run holds the workdir. `release()` is idempotent."""

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 300.0,
                 settle_s: float = 2.0):
        self.path = files.join(workdir, LOCK_NAME)
        self.remote = files.is_remote(workdir)
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.token = secrets.token_hex(8)
        self.lost = False
        self._fd: int | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, started: float) -> str:
        return json.dumps({"token": self.token, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": started, "alive": time.time()})

    def _busy(self, holder: dict, detail: str) -> ConfigError:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
               f"{_when(holder['started']) if 'started' in holder else 'at an unknown time'}")
        return ConfigError(
            f"workdir {files.dirname(self.path)} is in use by another jaxssl run ({who}){detail}; "
            "wait for it to end or stop it (SIGTERM or Ctrl-C saves and exits), or pass another "
            "--workdir: two runs in one workdir overwrite each other's checkpoints")

    def acquire(self) -> str | None:
        return self._acquire_remote() if self.remote else self._acquire_local()

    # A local file: flock, released by the kernel when this process ends.
    def _acquire_local(self) -> str | None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # being written by the holder this very moment
                holder = {}
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise self._busy(holder, "") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(time.time()).encode(), 0)
        self._fd, self._held = fd, True
        return None

    # An object in a bucket: a token and a heartbeat.
    def _read_remote(self) -> dict | None:
        try:
            return json.loads(files.read_text(self.path)) if files.exists(self.path) else None
        except (ValueError, OSError):
            return {}  # unreadable: treated as held, until its age is known to be stale

    def _acquire_remote(self) -> str | None:
        note = None
        holder = self._read_remote()
        if holder is not None:
            age = time.time() - float(holder.get("alive", time.time()))
            if age < self.stale_s:
                raise self._busy(holder, f", last alive {age:.0f} s ago; if that run is dead, "
                                 f"its lock expires {self.stale_s:.0f} s after that, or delete "
                                 f"{self.path}")
            note = (f"note: took over {self.path} of a run that stopped without releasing it "
                    f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, last "
                    f"alive {age:.0f} s ago)")
        started = time.time()
        files.write_text(self.path, self._record(started))
        time.sleep(self.settle_s)  # a run that read the same state writes within this time
        now = self._read_remote() or {}
        if now.get("token") != self.token:
            raise self._busy(now, ", which started at the same time as this one")
        self._held = True
        self._thread = threading.Thread(target=self._beat, args=(started,), daemon=True,
                                        name="jaxssl-lock-heartbeat")
        self._thread.start()
        return note

    def _beat(self, started: float) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read_remote() or {}
                if holder.get("token") != self.token:
                    self.lost = True
                    return
                files.write_text(self.path, self._record(started))
            except Exception:  # a failed upload: the next beat tries again
                continue

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock; the file stays
            self._fd = None
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            if not self.lost and (self._read_remote() or {}).get("token") == self.token:
                files.remove(self.path)
        except Exception:  # the lock expires by itself
            pass
