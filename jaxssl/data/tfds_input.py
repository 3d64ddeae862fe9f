"""TFDS splits too large for memory: read by index (array_record) or streamed (TFRecord).

`sources.load_tfds` holds a split in memory when it fits in max_gib; otherwise it reads it here.

- **array_record** (`tfds build NAME --file_format=array_record`): `TfdsIndex`, read by index
  through TFDS's data source, the image left encoded. It is a `Source.reader` like
  `records.Records`: the stateless BatchPlan names each step's rows, each process reads only its
  own, tf.data gets the JPEG/PNG bytes and `augment_tf.two_views_encoded` decodes only the union
  of the two crops. Resume is exact; the kNN monitor and evaluation work as with records.
- **TFRecord** (the default of `tfds build`): `tfds_stream.TfdsStream`, streamed per process
  in an order of (seed, epoch), resumed exactly; no random access (see that module).

Both give `Source.labels` int32 [N] at start-up (num_classes, the probe, the kNN monitor) from
one pass over every record, which also checks that every image is JPEG or PNG (what
`augment_tf.decode_window` decodes). The pass is a one-off cost, announced when it starts: its
result, with the mean/std of a 500-image sample, is cached in `jaxssl-index-<split>-<key>.npz`
next to the dataset (or under ~/.cache/jaxssl/tfds when that folder is not writable), keyed by
the dataset's name, config, version, the split's files, their example ranges and byte sizes.
Every process of a multi-process run makes the same pass unless the cache is there already.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxssl import files
from jaxssl.data.records import RecordsError

__all__ = ["TfdsIndex", "TfdsInputError", "load_indexed", "decoded_dataset", "dataset_index",
           "file_format", "split_instructions", "slice_instructions"]

# Records per read in the index pass.
_CHUNK = 1024
_CACHE_VERSION = 1
_STATS_SAMPLE = 500  # as load_folder
_STATS_PIXELS_PER_IMAGE = 1 << 16
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
_OTHER = {b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP", b"II*\0": "TIFF", b"MM\0*": "TIFF"}

Instructions = list[tuple[str, int, int]]  # (file path, records skipped, records taken)


class TfdsInputError(RecordsError):
    """A TFDS split that cannot be read as it is (damaged, not JPEG/PNG, no random access);
    the message says what to do, in one line. A `records.RecordsError`, so the command line
    prints one that ends a run as it does for damaged records."""


def _tf():
    from jaxssl.data.tf_import import tf

    return tf()


def _tfds():
    _tf()  # first, so TensorFlow hides the accelerators before TFDS initialises it
    import tensorflow_datasets as tfds

    return tfds


def _one_line(e: BaseException) -> str:
    """`Type: message` on one line, without TensorFlow's op decorations."""
    text = re.sub(r"\{\{function_node [^}]*\}\}|\s*\[Op:[^\]]*\].*", "",
                  str(getattr(e, "message", None) or e))
    return " ".join(f"{type(e).__name__}: {text}".split())[:300]


def file_format(builder) -> str | None:
    """The file format a prepared builder's files are in: "tfrecord", "array_record", ..."""
    fmt = builder.info.file_format
    return getattr(fmt, "value", fmt)


def split_instructions(builder, name: str, split: str) -> Instructions:
    """The files of `split` (slices included) in TFDS's order, as (path, skip, take) each;
    a one-line TfdsInputError (a ValueError) for an unknown split."""
    try:
        found = builder.info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "nknown split" in first or isinstance(e, KeyError):
            first = f"it has no split {split!r}; its splits are {', '.join(builder.info.splits)}"
        raise TfdsInputError(f"TFDS dataset '{name}': {first}") from None
    return [(os.fspath(f.filename), int(f.skip), int(f.take)) for f in found if f.take]


def slice_instructions(instructions: Instructions, start: int, stop: int) -> Instructions:
    """The instructions of examples [start, stop) of those in `instructions`."""
    out, offset = [], 0
    for path, skip, take in instructions:
        lo, hi = max(start, offset), min(stop, offset + take)
        if lo < hi:
            out.append((path, skip + lo - offset, hi - lo))
        offset += take
    return out


def _encoding_error(desc: str, index: int, data: bytes) -> TfdsInputError:
    kind = next((v for k, v in _OTHER.items() if data.startswith(k)), "an unknown format")
    base = desc.split("[", 1)[0]
    return TfdsInputError(
        f"{desc}: image {index} is stored as {kind}, not JPEG or PNG bytes, which jaxssl decodes "
        f"in tf.data; convert the split once with `jaxssl prepare --input {base} --output DIR` "
        f"and train from those records")


def _check_encoding(desc: str, index: int, data: bytes) -> None:
    if not any(data.startswith(m) for m in _MAGIC):
        raise _encoding_error(desc, index, data)


def _stats(images: Sequence[bytes]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel of pixel / 255 of JPEG/PNG images, each strided down to about
    65k pixels (as load_folder and `jaxssl prepare`)."""
    from jaxssl.data.folder import parallel_map, pixel_histogram
    from jaxssl.data.records import decode_record
    from jaxssl.data.sources import stats_from_histogram

    def histogram(data: bytes) -> np.ndarray:
        rgb = decode_record(data)
        stride = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / _STATS_PIXELS_PER_IMAGE)))
        return pixel_histogram(rgb[::stride, ::stride])

    return stats_from_histogram(sum(parallel_map(histogram, images)))


def _stats_sample(n: int) -> np.ndarray:
    """The sorted indices whose images enter the mean/std: int64 [min(n, 500)]."""
    return np.sort(np.random.default_rng(0).choice(n, min(n, _STATS_SAMPLE), replace=False))


# ----------------------------------------------------------------------------- the index cache


def _file_sizes(paths: Sequence[str], desc: str) -> list[int]:
    """Byte sizes of the split's files (on threads: a bucket answers each in tens of ms); a
    one-line error names a missing one."""
    from jaxssl.data.folder import parallel_map

    T = _tf()

    def size(path: str) -> int:
        try:
            return int(T.io.gfile.stat(path).length)
        except T.errors.NotFoundError:
            raise TfdsInputError(
                f"{desc}: file {os.path.basename(path)} of the prepared dataset is missing from "
                f"{os.path.dirname(path)}; restore it, or prepare the dataset again") from None

    return list(parallel_map(size, paths, num_threads=min(32, max(1, len(paths)))))


def _home_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxssl", "tfds")


def _writable(folder: str) -> bool:
    """Whether the index may be written into `folder` (made if need be). A bucket is tried:
    a refusal there fails at once."""
    if files.is_remote(folder):
        return True
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def _load_cache(path: str, key: str) -> dict | None:
    try:
        if not files.exists(path):
            return None
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files}
    except Exception:  # unreadable, partial or foreign: made again
        return None


def _store_cache(folders: Sequence[str], name: str, arrays: dict) -> str | None:
    """Writes the index into the first folder that takes it (atomically: processes making the
    same pass race harmlessly); its path, or None."""
    data = io.BytesIO()
    np.savez(data, **arrays)
    for folder in folders:
        if not _writable(folder):
            continue
        try:
            files.makedirs(folder)
            files.write_bytes(files.join(folder, name), data.getvalue())
            return files.join(folder, name)
        except Exception:  # e.g. a read-only bucket: the next folder
            continue
    return None


def dataset_index(builder, split: str, desc: str, instructions: Instructions,
                  compute: Callable[[], dict], say: Callable[[str], None]) -> dict:
    """The split's index: {"labels": int64 [N] (-1: none), "mean", "std": float64 [3]}, from
    the cache or from `compute()` (a pass over every record), which is then cached."""
    paths = list(dict.fromkeys(p for p, _, _ in instructions))
    sizes = dict(zip(paths, _file_sizes(paths, desc)))
    key = hashlib.sha256(json.dumps({
        "version": _CACHE_VERSION, "dataset": builder.info.full_name,
        "files": [[os.path.basename(p), s, t, sizes[p]] for p, s, t in instructions],
    }).encode()).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
    name = f"jaxssl-index-{safe}-{key[:16]}.npz"
    folders = [os.fspath(builder.data_dir),
               os.path.join(_home_cache(), builder.info.full_name.replace("/", "-"))]
    for folder in folders:
        found = _load_cache(files.join(folder, name), key)
        if found is not None:
            return found
    count = sum(t for _, _, t in instructions)
    say(f"{desc}: reading all {count:,} records ({sum(sizes.values()) / 2**30:.2f} GiB) once for "
        f"their labels and to check their encoding; a one-off cost, the result is cached")
    started = time.monotonic()
    arrays = compute()
    arrays["key"] = np.array(key)
    where = _store_cache(folders, name, arrays)
    say(f"{desc}: index made in {time.monotonic() - started:.0f} s; "
        + (f"cached in {where}" if where else "not cached (no writable folder)"))
    return arrays


def _progress(say, desc: str, total: int):
    started = last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 30:
            last = now
            say(f"{desc}: {done:,}/{total:,} records read ({now - started:.0f} s)")

    return report


def _labels(raw: np.ndarray | None, desc: str) -> np.ndarray | None:
    """int32 [N] labels, or None when there are none (no ClassLabel, or all -1)."""
    if raw is None or raw.size == 0 or (raw < 0).all():
        return None
    if (raw < 0).any():
        raise TfdsInputError(f"{desc} mixes labelled and unlabelled (-1) examples; load a split "
                             f"that is one or the other")
    return raw.astype(np.int32)


# ----------------------------------------------------------------------------- array_record


class TfdsIndex:
    """An array_record split read by index: what `Source.reader` needs (`read_bytes`, `read`,
    `__len__`), as `records.Records`. Thread-safe; pickled, it reopens the split from its
    folder."""

    random_access = True

    def __init__(self, builder, split: str, image_key: str, desc: str):
        self._dir = os.fspath(builder.data_dir)
        self._builder = builder
        self.split, self.image_key, self.name = split, image_key, desc
        self._source = None
        self._lock = threading.Lock()
        self.num_examples = len(self._raw())

    def _raw(self):
        """TFDS's ArrayRecord data source of serialized examples, opened once."""
        if self._source is None:
            with self._lock:
                if self._source is None:
                    tfds = _tfds()
                    builder = self._builder or tfds.builder_from_directory(self._dir)
                    try:
                        self._source = builder.as_data_source(
                            split=self.split,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES).data_source
                    except Exception as e:
                        raise TfdsInputError(
                            f"{self.name}: cannot open its array_record files ({_one_line(e)}); "
                            f"prepare the dataset again") from None
        return self._source

    def __len__(self) -> int:
        return self.num_examples

    def examples(self, indices: Sequence[int]) -> list[tuple[bytes, int]]:
        """(encoded image, label or -1) of each index, in order."""
        from tensorflow.core.example import example_pb2

        indices = [int(i) for i in indices]
        if not indices:
            return []
        try:
            raw = self._raw().__getitems__(indices)
            out = []
            for r in raw:
                feature = example_pb2.Example.FromString(r).features.feature
                label = feature["label"].int64_list.value if "label" in feature else ()
                out.append((feature[self.image_key].bytes_list.value[0],
                            int(label[0]) if label else -1))
            return out
        except Exception as e:
            raise TfdsInputError(f"{self.name}: cannot read records ({_one_line(e)}): its "
                                 f"array_record files are damaged; restore them, or prepare the "
                                 f"dataset again") from None

    def read_bytes(self, indices: Sequence[int]) -> list[bytes]:
        """The encoded images (JPEG or PNG bytes) at `indices`, in order."""
        return [data for data, _ in self.examples(indices)]

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The images at `indices`, decoded to uint8 [H, W, 3] RGB each (Pillow)."""
        from jaxssl.data.records import decode_record

        return [decode_record(b) for b in self.read_bytes(indices)]

    def __getstate__(self):
        return {**self.__dict__, "_builder": None, "_source": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _index_pass(reader: TfdsIndex, say) -> dict:
    n = len(reader)
    labels = np.empty(n, np.int64)
    sample = set(_stats_sample(n).tolist())
    sampled, report = [], _progress(say, reader.name, n)
    for start in range(0, n, _CHUNK):
        for i, (data, label) in enumerate(reader.examples(range(start, min(n, start + _CHUNK))),
                                          start):
            _check_encoding(reader.name, i, data)
            labels[i] = label
            if i in sample:
                sampled.append(data)
        report(min(n, start + _CHUNK))
    mean, std = _stats(sampled)
    return {"labels": labels, "mean": np.array(mean), "std": np.array(std)}


def _source(desc: str, reader, index: dict, label_names) -> Any:
    from jaxssl.data.sources import Source

    labels = _labels(index["labels"], desc) if label_names is not None else None
    return Source(name=desc, num_examples=len(reader), labels=labels,
                  class_names=tuple(label_names) if labels is not None else None,
                  mean=tuple(float(x) for x in index["mean"]),
                  std=tuple(float(x) for x in index["std"]), reader=reader)


def load_indexed(builder, name: str, split: str, image_key: str, label_names,
                 say: Callable[[str], None] = print) -> Any:
    """An array_record split as a Source read by index (`TfdsIndex`). label_names: the
    ClassLabel's names, or None when the dataset has no ClassLabel "label"."""
    desc = f"tfds:{name}/{split}"
    instructions = split_instructions(builder, name, split)
    reader = TfdsIndex(builder, split, image_key, desc)
    if not len(reader):
        raise TfdsInputError(f"{desc} holds no examples; pick another split")
    index = dataset_index(builder, split, desc, instructions, lambda: _index_pass(reader, say), say)
    return _source(desc, reader, index, label_names)


def decoded_dataset(builder, name: str, split: str, image_key: str):
    """An array_record split as the tf.data.Dataset `builder.as_dataset` would give (which
    TFDS cannot make from array_record): {image_key: decoded by the feature, "label" (-1 when
    none)}, for a split small enough for memory."""
    T = _tf()
    split_instructions(builder, name, split)  # a one-line error for an unknown split
    reader = TfdsIndex(builder, split, image_key, f"tfds:{name}/{split}")
    data, labels = zip(*reader.examples(range(len(reader)))) if len(reader) else ((), ())
    feature = builder.info.features[image_key]
    ds = T.data.Dataset.from_tensor_slices({  # object, not "S": no padding to the longest
        "image": np.array(data, dtype=object) if data else np.zeros(0, bytes),
        "label": np.array(labels, np.int64)})
    return ds.map(lambda ex: {image_key: feature.decode_example(ex["image"]), "label": ex["label"]})
