"""Multi-process (multi-host) start-up with JAX's own runtime, `jax.distributed`.

`initialize` starts it when, and only when, the job is one of several processes: explicit flags
(`--coordinator HOST:PORT --num_processes N --process_id I`), a SLURM job step with more than
one task, or a multi-host Cloud TPU slice (JAX reads the cluster from their environment). A plain
single machine never starts it. Afterwards every process sees all devices of all processes in
`jax.devices()`, reads its own part of the data (`jaxssl.data.pipeline.BatchPlan`) and the global
batches are assembled with `jax.make_array_from_process_local_data`.

Must run before anything touches a JAX backend (`jax.devices()`, the first computation).
"""

from __future__ import annotations

import os

import jax
import numpy as np

__all__ = ["initialize", "launcher", "any_process", "processes_where", "any_process_each",
           "from_process_0", "barrier"]


def launcher() -> str | None:
    """The multi-process launcher this process runs under ("slurm", "tpu_pod"), or None."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu_pod"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> str | None:
    """Start jax.distributed if this is one of several processes; returns how ("flags",
    "slurm", "tpu_pod") or None when it is a single process.

    ValueError (one line) for inconsistent flags, or when the processes do not all meet the
    coordinator within timeout_s (an unreachable coordinator, process counts that differ
    between processes, a process id given twice) instead of a hang.
    """
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num_processes and --process_id go together: give all "
                         "three (e.g. --coordinator host0:12355 --num_processes 2 --process_id 0)")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must lie in [0, {num_processes}) and --num_processes "
                             f"be >= 1; got process {process_id} of {num_processes}")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator wants HOST:PORT (process 0's address); got "
                             f"{coordinator!r}")
        if num_processes == 1:
            return None
        how, kwargs = "flags", dict(coordinator_address=coordinator,
                                    num_processes=num_processes, process_id=process_id)
    else:
        how, kwargs = launcher(), {}
        if how is None:
            return None
    if how == "flags" and process_id != 0:
        # JAX's client aborts the whole process (no exception, a C++ stack) when the coordinator
        # never answers, or when what answers is not a coordinator: find out first.
        _wait_for(coordinator, timeout_s)
    elif how == "flags":
        _port_free(coordinator)
    # CPU processes exchange collectives over gloo (the test bed: N processes on one machine);
    # GPUs and TPUs use their own interconnect and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f" at {coordinator}" if coordinator else ""
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, ...) or a launcher's mistake
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"jax.distributed did not start ({how}){where} within {timeout_s} s: {first}; check "
            "that every process got the same --coordinator and --num_processes, a distinct "
            "--process_id, and that process 0 is running and reachable") from e
    if how == "flags":
        # The coordinator does not compare the process counts its clients were given: a process
        # told N = 3 joins a job of 2. Every process compares them now, and all stop together.
        from jax.experimental import multihost_utils

        told = multihost_utils.process_allgather(np.array([num_processes, process_id], np.int32))
        counts, ids = sorted(set(told[:, 0].tolist())), sorted(told[:, 1].tolist())
        if counts != [jax.process_count()] or ids != list(range(jax.process_count())):
            # Every process is here: leave together now, not after the exit barrier's timeout.
            jax.distributed.shutdown()
            raise ValueError(
                f"the processes disagree: --num_processes {counts} and --process_id {ids} for "
                f"{jax.process_count()} processes that started; give every process the same "
                "--num_processes and each a distinct --process_id from 0")
    return how


# The start of an HTTP/2 connection (RFC 9113 section 3.4): the client preface and an empty
# SETTINGS frame. JAX's coordinator is a gRPC server: it answers with its own SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _wait_for(address: str, timeout_s: int) -> None:
    """Return once HOST:PORT accepts a connection and answers as an HTTP/2 (gRPC) server does;
    ValueError after timeout_s, or at once when what answers is something else."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as conn:
                reply = _first_frame_header(conn)
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"the coordinator {address} did not answer within {timeout_s} s ({e}); start "
                    "process 0 there (--process_id 0), or fix --coordinator") from e
            time.sleep(0.5)
            continue
        if len(reply) < 9 or reply[3] != 4:  # no frame, or not SETTINGS
            raise ValueError(
                f"something answers at {address}, but not as JAX's coordinator does (no gRPC "
                f"reply: {reply[:16]!r}); --coordinator must be process 0's address and a port "
                "nothing else uses")
        return


def _first_frame_header(conn) -> bytes:
    """Send the HTTP/2 preface on `conn`; the first 9 bytes of the reply (fewer if it ends)."""
    conn.settimeout(10)
    conn.sendall(_HTTP2_PREFACE)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = conn.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError:
        pass
    return reply


def _port_free(address: str) -> None:
    """Process 0 serves the coordinator at the port of `address`: ValueError (one line) when
    another program on this machine listens there already (JAX would abort with a C++ stack)."""
    import errno
    import socket

    port = int(address.rpartition(":")[2])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # not ours to judge (e.g. a privileged port): JAX says what it finds
            raise ValueError(
                f"port {port} of --coordinator {address} is in use on this machine (another "
                "job, or a previous run still exiting); give every process another port") from None


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes on which `flag` is true, the same list on every process (a
    collective: every process must call it at the same point). One process: [0] or []."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def any_process_each(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is true on any process (one collective for all of them)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    told = np.asarray(multihost_utils.process_allgather(np.array(flags, np.int32)))
    return tuple(bool(x) for x in told.reshape(-1, len(flags)).max(axis=0))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (a collective: every process
    must call it at the same point). One process: the flag itself."""
    return bool(processes_where(flag))


def from_process_0(values: list[int]) -> list[int]:
    """Process 0's list of integers, on every process (a collective). One process: `values`."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    mine = np.asarray(values if jax.process_index() == 0 else [0] * n, np.int64).reshape(n)
    return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(mine))]


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
