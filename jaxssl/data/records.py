"""Record shards: encoded images read by index, for datasets too large to hold in memory.

`jaxssl prepare` (`prepare`) writes a directory, local or in a bucket:

    index.json                  what the dataset is: count, class names, mean/std, the shards
                                (name, examples, bytes, sha256), the source, a content hash,
                                the files skipped. Written last: its presence marks a complete
                                dataset.
    index.npz                   per record: shard, byte offset, length, CRC-32, label (int32
                                arrays: 17 bytes a record, 22 MB for ImageNet's 1.28M).
    shard-00000-of-01252.rec    the images' bytes, end to end, as the input stored them:
    ...                         JPEGs are never re-encoded. Images a TensorFlow or Pillow
                                JPEG decoder could read differently from `decode_rgb` (CMYK,
                                EXIF-rotated, not JPEG at all) are stored as lossless PNG of
                                the pixels `decode_rgb` returns.

`Records(path)` opens one: start-up reads the two index files and lists the shards (it checks
that each exists with the size the index names), nothing else. `read_bytes(indices)` reads
records by index (pread locally, ranged reads on threads in a bucket) and checks each
against its CRC-32; `read(indices)` also decodes them. No per-example Python object is made
until a record is read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxssl import files

__all__ = ["FORMAT", "Records", "RecordsError", "prepare", "decode_record", "is_records_dir"]

FORMAT, VERSION = "jaxssl-records", 1
INDEX_JSON, INDEX_ARRAYS, PLAN_JSON, PARTS = "index.json", "index.npz", "prepare.json", "parts"
# Examples per shard: ~110 MB of ImageNet JPEGs, a few hundred objects for a bucket to list.
SHARD_EXAMPLES = 1024
# Records read at once from a bucket: ranged GETs take tens of ms each, so many run in parallel.
REMOTE_READ_THREADS = 32
# Local shards each reading thread keeps open.
OPEN_SHARDS = 64
# Every this-many-th example of a shard adds its pixels to the dataset's mean/std.
_STATS_EVERY = 8
_STATS_PIXELS_PER_IMAGE = 1 << 16
_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


class RecordsError(ValueError):
    """A records directory that cannot be used as it is; the message says what to do, in one
    line."""


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.rec"


def is_records_dir(path: str) -> bool:
    return files.exists(files.join(path, INDEX_JSON))


# ----------------------------------------------------------------------------- reading


class Records:
    """A prepared records directory, opened for reading by index.

    num_examples; labels int32 [N] or None; class_names; mean, std (per channel, of pixel /
    255); name; info (index.json as a dict). Thread-safe: `read_bytes` may run on many threads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = files.resolve(path)
        self._local = not files.is_remote(self.path)
        try:
            self.info, arrays = self._read_index()
            self._check_shards()
        except RecordsError:
            raise
        except FileNotFoundError as e:
            raise RecordsError(f"records {self.path}: {e}") from None
        except (OSError, ValueError, KeyError) as e:
            raise RecordsError(f"cannot read records {self.path}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]}") from None
        self.shard, self.offset, self.length, self.crc = (
            arrays["shard"], arrays["offset"], arrays["length"], arrays["crc"])
        self.labels = arrays["label"] if "label" in arrays else None
        names = self.info.get("class_names")
        self.class_names = tuple(names) if names else None
        self.num_examples = int(self.info["count"])
        self.mean = tuple(float(x) for x in self.info["mean"])
        self.std = tuple(float(x) for x in self.info["std"])
        self.name = f"records:{self.path}"
        self._open = threading.local()  # per thread: shard -> open file (local shards)
        self._fs = None  # the fsspec filesystem of a bucket, False when there is none
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _read_index(self) -> tuple[dict, dict[str, np.ndarray]]:
        index = files.join(self.path, INDEX_JSON)
        if not files.exists(index):
            if not files.exists(self.path):
                raise RecordsError(f"records directory {self.path} does not exist; make it with "
                                   f"`jaxssl prepare --input FOLDER --output {self.path}`")
            plan = files.join(self.path, PLAN_JSON)
            if files.exists(plan):
                raise RecordsError(f"records {self.path} are not finished (`jaxssl prepare` "
                                   f"stopped before writing {INDEX_JSON}); run the same prepare "
                                   f"command again to finish them")
            raise RecordsError(f"{self.path} has no {INDEX_JSON}: it is not a jaxssl records "
                               f"directory; make one with `jaxssl prepare --input FOLDER "
                               f"--output DIR`")
        try:
            info = json.loads(files.read_text(index))
        except json.JSONDecodeError as e:
            raise RecordsError(f"{index} is not valid JSON ({e}); prepare the records again") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise RecordsError(f"{index} is not a jaxssl records index; prepare the records again")
        if info.get("version") != VERSION:
            raise RecordsError(f"{index} is records format version {info.get('version')}, this "
                               f"jaxssl reads version {VERSION}; prepare the records again")
        data = files.read_bytes(files.join(self.path, INDEX_ARRAYS))
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise RecordsError(f"{files.join(self.path, INDEX_ARRAYS)} is damaged ({type(e).__name__}); "
                               f"prepare the records again") from None
        count = int(info["count"])
        shards = info["shards"]
        wanted = ("shard", "offset", "length", "crc")
        if any(k not in arrays or arrays[k].shape != (count,) for k in wanted) or \
                ("label" in arrays and arrays["label"].shape != (count,)):
            raise RecordsError(f"{INDEX_ARRAYS} of {self.path} does not match its {INDEX_JSON} "
                               f"({count} records); prepare the records again")
        counts = np.bincount(arrays["shard"], minlength=len(shards))
        if len(counts) != len(shards) or any(int(c) != s["count"] for c, s in zip(counts, shards)):
            raise RecordsError(f"the index of {self.path} does not match its shards' counts; "
                               f"prepare the records again")
        ends = arrays["offset"].astype(np.int64) + arrays["length"]
        sizes = np.array([s["bytes"] for s in shards], np.int64)
        if count and (ends > sizes[arrays["shard"]]).any():
            raise RecordsError(f"the index of {self.path} points past the end of its shards; "
                               f"prepare the records again")
        return info, arrays

    def _check_shards(self) -> None:
        """Every shard is there with the size the index names (one listing in a bucket)."""
        shards = self.info["shards"]
        if self._local:
            for s in shards:
                p = os.path.join(self.path, s["name"])
                if not os.path.isfile(p):
                    raise RecordsError(f"shard {s['name']} of {self.path} is missing; restore it "
                                       f"or prepare the records again")
                size = os.path.getsize(p)
                if size != s["bytes"]:
                    raise RecordsError(
                        f"shard {s['name']} of {self.path} is {size:,} bytes, the index says "
                        f"{s['bytes']:,}: it is truncated or from another dataset; restore it "
                        f"or prepare the records again")
            return
        present = set(files.listdir(self.path))
        missing = [s["name"] for s in shards if s["name"] not in present]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise RecordsError(f"shard {missing[0]}{more} of {self.path} is missing; restore it "
                               f"or prepare the records again")

    # -- reading records

    def __len__(self) -> int:
        return self.num_examples

    def _record(self, i: int) -> bytes:
        s, o, n = int(self.shard[i]), int(self.offset[i]), int(self.length[i])
        if self._local:
            # pread, not a memory map: a mapped shard's pages count in the process's resident
            # memory (read-ahead maps megabytes per fault: 175 MB for 256 records measured),
            # growing towards the dataset's size over an epoch.
            try:
                data = os.pread(self._shard_file(s).fileno(), n, o)
            except OSError as e:
                raise RecordsError(f"cannot read shard {self.info['shards'][s]['name']} of "
                                   f"{self.path}: {e.strerror or e}; restore it or prepare the "
                                   f"records again") from None
        else:
            name = self.info["shards"][s]["name"]
            try:
                data = files._retried(lambda: self._range(files.join(self.path, name), o, n))
            except Exception as e:
                raise RecordsError(f"cannot read shard {name} of {self.path}: "
                                   f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        if len(data) != n or zlib.crc32(data) != int(self.crc[i]):
            name = self.info["shards"][s]["name"]
            raise RecordsError(f"record {i} in shard {name} of {self.path} fails its checksum: "
                               f"the shard is corrupt; restore it or prepare the records again")
        return data

    def _shard_file(self, s: int) -> io.FileIO:
        """Shard s opened for this thread: the last OPEN_SHARDS shards each thread read stay
        open (ImageNet's 1252 shards would pass the usual limit of 1024 open files), and a
        thread's files close when it ends (they are its own, so none closes under another)."""
        cache = getattr(self._open, "files", None)
        if cache is None:
            cache = self._open.files = collections.OrderedDict()
        f = cache.get(s)
        if f is not None:
            cache.move_to_end(s)
            return f
        f = cache[s] = io.FileIO(os.path.join(self.path, self.info["shards"][s]["name"]), "r")
        if len(cache) > OPEN_SHARDS:
            cache.popitem(last=False)[1].close()
        return f

    def _range(self, path: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a remote file: one ranged GET through fsspec
        (gcsfs: `pip install -e '.[gcs]'`, part of '.[tpu]'), with no read-ahead; else
        through etils.epath (TensorFlow's gfile), opening the object for each read."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    try:
                        import fsspec

                        self._fs = fsspec.filesystem(path.split("://", 1)[0])
                    except Exception:  # no fsspec implementation of the protocol installed
                        self._fs = False
        if self._fs:
            return self._fs.cat_file(path, start=offset, end=offset + length)
        with files._remote(path).open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def read_bytes(self, indices: Sequence[int]) -> list[bytes]:
        """The encoded images at `indices`, in order, checked against their CRC-32."""
        indices = [int(i) for i in indices]
        if self._local or len(indices) < 2:
            return [self._record(i) for i in indices]
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        REMOTE_READ_THREADS, thread_name_prefix="jaxssl-records")
        return list(self._pool.map(self._record, indices))

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The images at `indices`, decoded to uint8 [H, W, 3] RGB each."""
        return [decode_record(b) for b in self.read_bytes(indices)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for f in getattr(self._open, "files", {}).values():
            f.close()
        self._open = threading.local()

    def __getstate__(self):  # worker processes reopen shards themselves
        state = self.__dict__.copy()
        state.update(_open=None, _fs=None, _lock=None, _pool=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open, self._lock = threading.local(), threading.Lock()


def decode_record(data: bytes) -> np.ndarray:
    """A record's image (JPEG or PNG bytes) as uint8 [H, W, 3] RGB."""
    from jaxssl.data.folder import pil_to_rgb

    with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
        im.load()
        return pil_to_rgb(im)


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class _Input:
    """What prepare reads: a folder (paths relative to root) or a TFDS split."""

    kind: str  # "folder" or "tfds"
    description: str
    count: int
    class_names: tuple[str, ...] | None
    root: str = ""
    paths: tuple[str, ...] = ()
    labels: np.ndarray | None = None  # folder: int32 [count]
    tfds_name: str = ""
    tfds_split: str = ""
    data_dir: str | None = None
    image_key: str = ""
    has_label: bool = False
    start: int = 0  # a part of the input (`part`): its first index

    def part(self, start: int, stop: int) -> "_Input":
        """Inputs [start, stop) alone: what one shard's worker is sent (not 1.28M paths)."""
        return dataclasses.replace(
            self, count=stop - start, start=self.start + start,
            paths=self.paths[start:stop] if self.paths else (),
            labels=None if self.labels is None else self.labels[start:stop])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.description.encode())
        h.update(json.dumps(self.class_names).encode())
        for p in self.paths:
            h.update(p.encode() + b"\0")
        if self.labels is not None:
            h.update(self.labels.tobytes())
        h.update(str(self.count).encode())
        return h.hexdigest()


def _folder_input(root: str, labelled) -> _Input:
    from jaxssl.data.folder import IMAGE_EXTENSIONS, _class_folders, _list_images

    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise RecordsError(f"input folder {root} does not exist or is not a folder; pass the "
                           f"directory that holds your images")
    rel, others = _list_images(root, IMAGE_EXTENSIONS)
    if not rel:
        raise RecordsError(f"input folder {root} holds no image files "
                           f"({', '.join(IMAGE_EXTENSIONS)}); point --input at your images")
    try:
        class_names = _class_folders(root, rel, labelled)
    except ValueError as e:
        raise RecordsError(str(e)) from None
    labels = None
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[p.split(os.sep, 1)[0]] for p in rel], np.int32)
    return _Input("folder", f"folder:{root}", len(rel), class_names, root=root, paths=tuple(rel),
                  labels=labels)


def _tfds_input(spec: str, data_dir: str | None) -> _Input:
    from jaxssl.data.sources import _tfds_builder, _tfds_not_prepared
    from jaxssl.data.tf_import import tf

    tf()
    import tensorflow_datasets as tfds

    name, _, split = spec.partition("/")
    split = split or "train"
    try:
        builder = _tfds_builder(tfds, name, data_dir)
    except ValueError as e:
        raise RecordsError(str(e)) from None
    if not builder.is_prepared():
        raise RecordsError(str(_tfds_not_prepared(builder, name, split)))
    info = builder.info
    image_keys = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
        raise RecordsError(f"TFDS dataset '{name}' has no image feature; pick an image dataset")
    try:
        count = int(info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
        raise RecordsError(f"TFDS dataset '{name}' has no split {split!r}; its splits are "
                           f"{', '.join(info.splits)}") from e
    label = info.features["label"] if "label" in info.features else None
    has_label = isinstance(label, tfds.features.ClassLabel)
    return _Input("tfds", f"tfds:{name}/{split}", count,
                  tuple(label.names) if has_label else None, tfds_name=name, tfds_split=split,
                  data_dir=data_dir, image_key="image" if "image" in image_keys else image_keys[0],
                  has_label=has_label)


def _items(inp: _Input):
    """(source id, bytes or an exception, label, formats) of every input of `inp`."""
    if inp.kind == "folder":
        from jaxssl.data.folder import image_formats

        for i in range(inp.count):
            path = os.path.join(inp.root, inp.paths[i])
            label = int(inp.labels[i]) if inp.labels is not None else -1
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                data = e
            yield inp.paths[i], data, label, image_formats(os.path.splitext(path)[1])
        return
    from jaxssl.data.tf_import import tf

    tf()
    import tensorflow_datasets as tfds

    builder = tfds.builder(inp.tfds_name, data_dir=inp.data_dir, try_gcs=False)
    start, stop = inp.start, inp.start + inp.count
    from jaxssl.data import tfds_input

    if tfds_input.file_format(builder) == "array_record":  # as_dataset cannot read these
        index = tfds_input.TfdsIndex(builder, inp.tfds_split, inp.image_key, inp.description)
        for j, (data, label) in enumerate(index.examples(range(start, stop))):
            yield (f"{inp.description}[{start + j}]", bytes(data),
                   label if inp.has_label else -1, ("JPEG", "PNG"))
        return
    ds = builder.as_dataset(split=f"{inp.tfds_split}[{start}:{stop}]", shuffle_files=False,
                            decoders={inp.image_key: tfds.decode.SkipDecoding()})
    for j, ex in enumerate(tfds.as_numpy(ds)):
        label = int(ex["label"]) if inp.has_label else -1
        yield f"{inp.description}[{start + j}]", bytes(ex[inp.image_key]), label, ("JPEG", "PNG")


def _checked(data: bytes, formats, max_pixels: int) -> tuple[bytes, np.ndarray, bool]:
    """(bytes to store, decoded RGB, converted?): the input's bytes when a JPEG decoder reads
    them as `decode_rgb` does, else a lossless PNG of decode_rgb's pixels. Raises for a bad
    image (not its format, truncated, too large)."""
    from jaxssl.data.folder import decode_opened

    with Image.open(io.BytesIO(data), formats=formats) as im:
        fmt, mode = im.format, im.mode
        rgb, oriented = decode_opened(im, "", max_pixels)
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L") and not oriented:
        return data, rgb, False
    if fmt == "PNG" and mode in ("RGB", "L") and not oriented:
        return data, rgb, False
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", compress_level=6)
    return out.getvalue(), rgb, True


def _write_shard(inp: _Input, output: str, i: int, n_shards: int, strict: bool,
                 max_pixels: int) -> dict:
    """Writes shard i of n_shards from `inp` (that shard's part of the input) and its part
    file; returns the part's summary."""
    from jaxssl.data.folder import _one_line, pixel_histogram

    blob, offsets, lengths, crcs, labels, skipped = io.BytesIO(), [], [], [], [], []
    hist, converted = np.zeros((3, 256), np.int64), 0
    for j, (ident, data, label, formats) in enumerate(_items(inp)):
        try:
            if isinstance(data, Exception):
                raise data
            stored, rgb, conv = _checked(data, formats, max_pixels)
        except Exception as e:
            reason = getattr(e, "reason", None) or _one_line(e)
            if strict:
                raise RecordsError(f"cannot read image {ident} ({reason}); remove or fix it, or "
                                   f"leave out --strict to skip unreadable images") from None
            skipped.append([ident, reason])
            continue
        converted += conv
        offsets.append(blob.tell())
        lengths.append(len(stored))
        crcs.append(zlib.crc32(stored))
        labels.append(label)
        blob.write(stored)
        if j % _STATS_EVERY == 0:
            stride = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / _STATS_PIXELS_PER_IMAGE)))
            hist += pixel_histogram(rgb[::stride, ::stride])
    data = blob.getvalue()
    name = shard_name(i, n_shards)
    files.write_bytes(files.join(output, name), data)
    part = io.BytesIO()
    np.savez(part, offset=np.array(offsets, np.int64), length=np.array(lengths, np.int64),
             crc=np.array(crcs, np.uint32), label=np.array(labels, np.int32), hist=hist,
             meta=np.frombuffer(json.dumps({
                 "name": name, "count": len(offsets), "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "skipped": skipped,
                 "converted": converted}).encode(), np.uint8))
    files.write_bytes(files.join(output, PARTS, f"{i:05d}.npz"), part.getvalue())
    return {"shard": i, "count": len(offsets), "skipped": len(skipped)}


def _load_part(output: str, i: int) -> dict | None:
    path = files.join(output, PARTS, f"{i:05d}.npz")
    if not files.exists(path):
        return None
    try:
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
        part["meta"] = json.loads(part["meta"].tobytes().decode())
        return part
    except Exception:  # a part cut short by a crash: the shard is written again
        return None


def _check_output(output: str, plan: dict) -> None:
    """The output is empty, or an unfinished or finished prepare of this same input."""
    if not files.exists(output):
        return
    if not files.isdir(output):
        raise RecordsError(f"output {output} is a file; pass a folder for the records")
    names = [n for n in files.listdir(output) if not n.startswith(".")]
    if not names:
        return
    plan_path = files.join(output, PLAN_JSON)
    if PLAN_JSON not in names:
        what = "another dataset's records" if INDEX_JSON in names else f"{len(names)} other files"
        raise RecordsError(f"output {output} is not empty (it holds {what}); pass an empty or new "
                           f"folder")
    try:
        old = json.loads(files.read_text(plan_path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    if old != plan and old.get("input_sha256") == plan["input_sha256"]:
        options = ", ".join(f"{k}={old.get(k)!r}" for k in ("shard_size", "strict", "max_pixels")
                            if old.get(k) != plan[k])
        raise RecordsError(f"output {output} holds records of this input prepared with other "
                           f"options ({options}); repeat those options to finish them, or pass "
                           f"an empty or new folder")
    if old != plan:
        raise RecordsError(
            f"output {output} holds the records of another input "
            f"({old.get('source', 'unknown')}, {old.get('count', '?')} images, shard size "
            f"{old.get('shard_size', '?')}); pass an empty or new folder, or the same input and "
            f"options to finish them")


def prepare(input: str, output: str, *, data_dir: str | None = None,
            shard_size: int = SHARD_EXAMPLES, workers: int = 0, strict: bool = False,
            labelled: bool | str = "auto", max_pixels: int | None = None,
            say: Callable[[str], None] = print) -> dict:
    """Writes the records of `input` (an image folder, or "tfds:NAME/SPLIT") to `output`.

    Resumable: a prepare that stopped (a crash, kill -9) is finished by running it again with
    the same arguments; the shards already written are kept. Every image is decoded once to
    check it: bad ones are skipped and listed (index.json "skipped"), or with strict=True the
    first is an error. workers: processes that write shards at once (0: the CPU count).
    Returns the index (index.json as a dict).
    """
    from jaxssl.data.folder import MAX_PIXELS

    if shard_size < 1:
        raise RecordsError(f"shard size must be at least 1, got {shard_size}")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    inp = _tfds_input(input[5:], data_dir) if input.startswith("tfds:") else \
        _folder_input(input, labelled)
    if inp.count == 0:
        raise RecordsError(f"{inp.description} holds no examples")
    output = files.resolve(output)
    plan = {"format": FORMAT, "version": VERSION, "source": inp.description, "count": inp.count,
            "shard_size": shard_size, "class_names": list(inp.class_names or []),
            "strict": strict, "max_pixels": limit, "input_sha256": inp.fingerprint()}
    _check_output(output, plan)
    if files.exists(files.join(output, INDEX_JSON)):
        say(f"{output} is complete already")
        return json.loads(files.read_text(files.join(output, INDEX_JSON)))
    files.makedirs(files.join(output, PARTS))
    files.write_text(files.join(output, PLAN_JSON), json.dumps(plan, indent=1))
    n_shards = -(-inp.count // shard_size)
    todo = [i for i in range(n_shards) if _load_part(output, i) is None]
    if len(todo) < n_shards:
        say(f"resuming: {n_shards - len(todo)} of {n_shards} shards are written already")
    workers = min(len(todo), workers or os.cpu_count() or 1)
    started, done = time.monotonic(), 0

    def report(summary: dict) -> None:
        nonlocal done
        done += 1
        if done == len(todo) or done % max(1, len(todo) // 20) == 0:
            say(f"shard {done}/{len(todo)} written ({time.monotonic() - started:.0f} s)")

    def task(i: int) -> tuple:
        return (inp.part(i * shard_size, min(inp.count, (i + 1) * shard_size)), output, i,
                n_shards, strict, limit)

    if workers <= 1:
        for i in todo:
            report(_write_shard(*task(i)))
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked copy of TensorFlow's threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_shard, *task(i)) for i in todo]
            try:
                for f in concurrent.futures.as_completed(futures):
                    report(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return _finish(output, inp, n_shards, plan, say)


def _finish(output: str, inp: _Input, n_shards: int, plan: dict, say) -> dict:
    from jaxssl.data.sources import stats_from_histogram

    parts = [_load_part(output, i) for i in range(n_shards)]
    if any(p is None for p in parts):
        raise RecordsError(f"a part of {output} vanished while preparing; run prepare again")
    shards = [p["meta"] for p in parts]
    count = sum(s["count"] for s in shards)
    skipped = [s for p in shards for s in p["skipped"]]
    if count == 0:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise RecordsError(f"none of the {inp.count} images of {inp.description} could be "
                           f"read{first}; check the files")
    arrays = {
        "shard": np.concatenate([np.full(s["count"], i, np.int32) for i, s in enumerate(shards)]),
        "offset": np.concatenate([p["offset"] for p in parts]).astype(np.int64),
        "length": np.concatenate([p["length"] for p in parts]).astype(np.int64),
        "crc": np.concatenate([p["crc"] for p in parts]).astype(np.uint32),
    }
    if inp.class_names is not None:
        arrays["label"] = np.concatenate([p["label"] for p in parts]).astype(np.int32)
    mean, std = stats_from_histogram(sum(p["hist"] for p in parts))
    content = hashlib.sha256()
    for s in shards:
        content.update(s["sha256"].encode())
    content.update(json.dumps(list(inp.class_names or [])).encode())
    if "label" in arrays:
        content.update(arrays["label"].tobytes())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files.write_bytes(files.join(output, INDEX_ARRAYS), buf.getvalue())
    info = {"format": FORMAT, "version": VERSION, "count": count,
            "class_names": list(inp.class_names) if inp.class_names else None,
            "mean": list(mean), "std": list(std), "source": inp.description,
            "content_sha256": content.hexdigest(),
            "shards": [{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in shards],
            "converted_to_png": sum(s["converted"] for s in shards),
            "skipped": skipped, "input_count": inp.count, "shard_size": plan["shard_size"]}
    files.write_text(files.join(output, INDEX_JSON), json.dumps(info, indent=1))
    for i in range(n_shards):
        try:
            files.remove(files.join(output, PARTS, f"{i:05d}.npz"))
        except FileNotFoundError:
            pass
    if not files.is_remote(output):
        try:
            os.rmdir(os.path.join(output, PARTS))
        except OSError:
            pass
    if skipped:
        shown = ", ".join(f"{p} ({r})" for p, r in skipped[:3])
        say(f"skipped {len(skipped)} of {inp.count} images that could not be read: {shown}"
            f"{', ...' if len(skipped) > 3 else ''} (index.json lists them all)")
    say(f"{count} images in {n_shards} shards written to {output}"
        + (f"; {info['converted_to_png']} stored as PNG" if info["converted_to_png"] else ""))
    return info


def source_from_records(path: str) -> Any:
    """A `jaxssl.data.sources.Source` reading the records at `path`."""
    from jaxssl.data.sources import Source

    r = Records(path)
    return Source(name=r.name, num_examples=r.num_examples, labels=r.labels,
                  class_names=r.class_names, mean=r.mean, std=r.std, reader=r,
                  skipped=tuple(tuple(s) for s in r.info.get("skipped", [])))
