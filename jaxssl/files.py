"""The files of a run in a local folder or in a bucket (gs://, s3://, az://).

Orbax reaches remote checkpoint directories by itself; everything else a run writes
(config.json, data.json, metrics.jsonl, TensorBoard events, PNGs, eval results, exports) goes
through these few functions, so a `--workdir gs://bucket/run` works on a Cloud TPU pod whose
hosts share no disk.

Local paths use the OS (a write is atomic: temporary file, fsync, rename). Remote paths use
etils.epath, which orbax already depends on: it takes TensorFlow's gfile where TensorFlow is
installed, and fsspec (gcsfs, s3fs) otherwise, so the GPU path without TensorFlow can still
write to a bucket when gcsfs is installed. An object store has no append and no rename: an object
is replaced whole by one upload, which is atomic there, and an "append" rewrites the object.
"""

from __future__ import annotations

import importlib.util
import os
import secrets

__all__ = ["REMOTE_PREFIXES", "is_remote", "resolve", "join", "dirname", "exists", "isdir",
           "isfile", "makedirs", "listdir", "read_bytes", "read_text", "write_bytes",
           "write_text", "append_text", "remove"]

REMOTE_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path (~ expanded), or the remote URI without a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    if is_remote(path):
        return path.rstrip("/").rpartition("/")[0]
    return os.path.dirname(os.path.abspath(path))


def _remote(path: str):
    from etils import epath

    if importlib.util.find_spec("tensorflow") is not None and \
            os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0"):
        # epath will take TensorFlow's gfile: import it our way first, GPUs hidden from it.
        from jaxssl.data.tf_import import tf

        tf()
    return epath.Path(path)


# Seconds to wait before each retry of a remote call that failed (a transient 429/503, a
# dropped connection): about 30 s in all, each wait jittered by +-50%. Errors that retrying
# cannot cure (permissions, a missing object) are raised at once.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


def _retried(call):
    import random
    import time

    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception:
            if delay is None:
                raise
            time.sleep(delay * random.uniform(0.5, 1.5))


def exists(path: str) -> bool:
    return _retried(_remote(path).exists) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _remote(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _remote(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return _retried(lambda: sorted(p.name for p in _remote(path).iterdir()))
    return sorted(os.listdir(path))


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _retried(_remote(path).read_bytes)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data`, all or nothing: a crash leaves the old file or
    the new one. Its folder must exist, as for open()."""
    if is_remote(path):
        # One upload: the object appears whole or not at all, so a retry is safe.
        _retried(lambda: _remote(path).write_bytes(data))
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 less the umask, as open() would give: mkstemp's 0o600 would survive the rename.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise type(e)(f"cannot write {path}: {e.strerror or e}") from e


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str, *, current: str | None = None) -> str | None:
    """Append `text` to the file at `path` and return the file's new contents where that is
    known cheaply (remote), else None. A remote "append" uploads the whole object again; pass
    the contents returned by the previous call as `current` to spare a download."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return None
    if current is None:
        current = read_text(path) if exists(path) else ""
    current += text
    write_text(path, current)
    return current


def remove(path: str) -> None:
    if is_remote(path):
        _retried(_remote(path).unlink)
    else:
        os.remove(path)


def move(src: str, dst: str) -> None:
    """Rename a file or folder (a folder in a bucket is copied object by object, then removed)."""
    if is_remote(src):
        _remote(src).rename(_remote(dst))
    else:
        os.replace(src, dst)
