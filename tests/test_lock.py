"""One run per workdir (issue 14, item 3): jaxssl.lock on a local folder (flock: released by the
kernel when its holder dies) and in a bucket (a token and a heartbeat, on the fake gs:// of
test_files). The trainer's use of it (a second run refused, nothing touched) is in
test_faults.py."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxssl import files
from jaxssl.configuration import ConfigError
from jaxssl.lock import LOCK_NAME, WorkdirLock
from test_files import bucket  # noqa: F401  (the fake gs:// fixture)


def test_a_local_workdir_is_held_by_one_run_at_a_time(tmp_path):
    first = WorkdirLock(str(tmp_path))
    assert first.acquire() is None
    with pytest.raises(ConfigError, match=rf"in use by another jaxssl run \(pid {os.getpid()} on "
                                          r"host .*, started 20\d\d-") as e:
        WorkdirLock(str(tmp_path)).acquire()
    assert "\n" not in str(e.value)
    first.release()
    first.release()  # twice is harmless
    second = WorkdirLock(str(tmp_path))
    assert second.acquire() is None
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == second.token
    second.release()


def test_a_killed_holder_leaves_no_local_lock(tmp_path):
    # kill -9: no release, no clean-up; the kernel drops the flock with the process.
    code = ("import os, signal, sys; from jaxssl.lock import WorkdirLock; "
            f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            "sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {proc.pid} "):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = WorkdirLock(str(tmp_path))
    assert lock.acquire() is None
    lock.release()


def test_of_two_local_runs_starting_together_one_goes_on(tmp_path):
    locks = [WorkdirLock(str(tmp_path)) for _ in range(8)]
    outcome = [None] * len(locks)
    start = threading.Barrier(len(locks))

    def take(i):
        start.wait()
        try:
            locks[i].acquire()
            outcome[i] = "held"
        except ConfigError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome) == ["held"] + ["refused"] * 7
    for lock in locks:
        lock.release()


def _write_holder(path, alive, token="someone", pid=99999):
    files.write_text(path, json.dumps({"token": token, "host": "tpu-vm-7", "pid": pid,
                                       "started": alive - 3600, "alive": alive}))


def test_a_bucket_lock_with_a_live_heartbeat_is_refused(bucket):  # noqa: F811
    files.makedirs("gs://b/run")
    _write_holder(f"gs://b/run/{LOCK_NAME}", time.time() - 20)
    with pytest.raises(ConfigError, match=r"pid 99999 on host tpu-vm-7, .*last alive 2\d s ago; "
                                          r"if that run is dead, its lock expires 300 s after "
                                          rf"that, or delete gs://b/run/{LOCK_NAME}"):
        WorkdirLock("gs://b/run", settle_s=0).acquire()
    assert json.loads(files.read_text(f"gs://b/run/{LOCK_NAME}"))["token"] == "someone"


def test_a_stale_bucket_lock_is_taken_over_and_the_heartbeat_keeps_it(bucket):  # noqa: F811
    path = f"gs://b/run/{LOCK_NAME}"
    files.makedirs("gs://b/run")
    _write_holder(path, time.time() - 301)
    lock = WorkdirLock("gs://b/run", heartbeat_s=0.05, settle_s=0)
    note = lock.acquire()
    assert note.startswith(f"note: took over {path} of a run that stopped without releasing it "
                           "(pid 99999 on host tpu-vm-7, last alive 30")
    first = json.loads(files.read_text(path))
    assert first["token"] == lock.token and first["pid"] == os.getpid()
    deadline = time.time() + 10
    while json.loads(files.read_text(path))["alive"] == first["alive"]:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.02)
    assert not lock.lost
    lock.release()
    assert not files.exists(path)  # its own lock is removed


def test_a_bucket_lock_taken_over_is_lost_and_not_removed(bucket):  # noqa: F811
    # The holder was suspended past the expiry, another run took the lock: the holder notices
    # at its next heartbeat (the trainer then stops without saving) and leaves the lock alone.
    path = f"gs://b/run/{LOCK_NAME}"
    files.makedirs("gs://b/run")
    lock = WorkdirLock("gs://b/run", heartbeat_s=0.05, settle_s=0)
    assert lock.acquire() is None
    _write_holder(path, time.time(), token="the-other-run")
    deadline = time.time() + 10
    while not lock.lost:
        assert time.time() < deadline, "the takeover went unnoticed"
        time.sleep(0.02)
    lock.release()
    assert json.loads(files.read_text(path))["token"] == "the-other-run"


def test_of_two_bucket_runs_starting_together_one_goes_on(bucket):  # noqa: F811
    # Both read "no lock", both write; after the settling time each reads back, and only the
    # one whose write came last finds its own token.
    files.makedirs("gs://b/run")
    locks = [WorkdirLock("gs://b/run", heartbeat_s=60, settle_s=0.5) for _ in range(2)]
    outcome = [None, None]
    start = threading.Barrier(2)

    def take(i):
        start.wait()
        try:
            locks[i].acquire()
            outcome[i] = "held"
        except ConfigError as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome)[0] == "held", outcome
    assert "started at the same time as this one" in sorted(outcome)[1] \
        or "last alive" in sorted(outcome)[1], outcome
    for lock in locks:
        lock.release()
