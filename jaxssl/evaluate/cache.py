"""The eval-mode features of a checkpoint, computed once and kept in the workdir.

`jaxssl eval knn|linear|fewshot|embed` all start from the backbone's features of train and eval
images; encoding them is what costs (the whole train split, for a linear probe or a full kNN
bank). A `FeatureCache` keeps the rows each evaluation computed in
WORKDIR/eval/features-<step>/, and the next evaluation of the same checkpoint reads them and
encodes only the rows it lacks:

    manifest.json        {"fingerprint": ..., "what": {...}, "splits": {"train": {...}, ...}}
    train-<token>.npy    float32 [m, F], the features of the rows below, in their order
    train-<token>-rows.npy   int64 [m], sorted row numbers of the split
    eval-<token>.npy ...

The manifest is written last (atomically) and names the files it goes with, so a crash while
writing leaves the previous cache (and stray files, removed by the next write). Its
fingerprint is a hash of the checkpoint's encoder (every parameter and BatchNorm statistic,
bit for bit), of what the data is (the data config, each split's size and labels, the
normalisation) and of how features are made (model config, image size): features of another
checkpoint or other data are never read; the cache is recomputed and replaced.

Only eval-mode features of the plain normalised images are kept (not the augmented views of
eval.linear_augment_copies, which are random). Local files are memory-mapped when read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from typing import Any, Callable

import jax
import numpy as np

from jaxssl import files

__all__ = ["FeatureCache", "fingerprint", "FORMAT"]

FORMAT = 1  # bump when what a cached row means changes


def _tree_digest(tree, digest) -> None:
    """Every leaf's path, dtype, shape and bytes into `digest` (replicated global arrays are
    read from this process's first copy)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())


def _labels_digest(labels) -> str | None:
    if labels is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes()).hexdigest()


def fingerprint(config, params, batch_stats, sources: dict[str, Any], *,
                crop_fraction: float = 0.875) -> tuple[str, dict]:
    """(hash, what it covers) of the features of `params`/`batch_stats` on `sources`
    ({"train": Source, "eval": Source}) as `config` makes them."""
    encoder = hashlib.sha256()
    _tree_digest({"params": params, "batch_stats": batch_stats}, encoder)
    what = {
        "format": FORMAT,
        "encoder_sha256": encoder.hexdigest(),
        "data": json.loads(config.data.to_json()),
        "model": json.loads(config.model.to_json()),
        "crop_fraction": crop_fraction,
        "splits": {name: {"name": s.name, "examples": int(s.num_examples),
                          "labels_sha256": _labels_digest(s.labels),
                          "mean": [float(v) for v in np.ravel(s.mean)],
                          "std": [float(v) for v in np.ravel(s.std)]}
                   for name, s in sources.items() if s is not None},
    }
    for field in ("augment", "recipe", "prefetch", "threads"):  # pretraining's input only
        what["data"].pop(field, None)
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return key, what


def _load(path: str) -> np.ndarray:
    if files.is_remote(path):
        return np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _save(path: str, array: np.ndarray) -> None:
    if files.is_remote(path):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        files.write_bytes(path, buffer.getvalue())
        return
    with open(path, "wb") as f:  # a new name: the manifest, written after, commits it
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class FeatureCache:
    """The cached features of one checkpoint in `folder` (WORKDIR/eval/features-<step>).

    key, what: from `fingerprint`. say: where a line about the cache goes. writer: whether this
    process writes the files (process 0); every process reads them.
    """

    def __init__(self, folder: str, key: str, what: dict, *, say: Callable[[str], None],
                 writer: bool = True):
        self.folder, self.key, self.what, self.say, self.writer = folder, key, what, say, writer
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        path = files.join(self.folder, "manifest.json")
        empty = {"fingerprint": self.key, "what": self.what, "splits": {}}
        if not files.isfile(path):
            return empty
        try:
            manifest = json.loads(files.read_text(path))
            found = manifest["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            self.say(f"the feature cache in {self.folder} is unreadable; recomputing it")
            return empty
        if found != self.key:
            self.say(f"the cached features in {self.folder} were made from another checkpoint, "
                     "other data or another model; recomputing them")
            return empty
        return manifest

    def _stored(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self.manifest["splits"].get(split)
        if entry is None:
            return None
        try:
            rows = _load(files.join(self.folder, entry["rows"]))
            features = _load(files.join(self.folder, entry["features"]))
        except (OSError, ValueError, KeyError) as e:
            self.say(f"cannot read the cached {split} features in {self.folder} ({e}); "
                     "recomputing them")
            return None
        if features.ndim != 2 or rows.shape != (features.shape[0],):
            self.say(f"the cached {split} features in {self.folder} are damaged (shapes "
                     f"{features.shape} and {rows.shape}); recomputing them")
            return None
        return rows, features

    def rows(self, split: str, indices, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Features [len(indices), F] of rows `indices` of `split` ("train" or "eval"), float32.

        Rows the cache lacks are computed by compute(sorted missing rows) -> [m, F] float32 (on
        every process alike) and added to it. When `indices` are exactly the cached rows (e.g.
        a whole split), a memory map of the file is returned, not a copy.
        """
        indices = np.asarray(indices, np.int64)
        stored = self._stored(split)
        rows = np.zeros(0, np.int64) if stored is None else np.asarray(stored[0])
        missing = np.setdiff1d(indices, rows)
        if len(missing) == 0:
            features = stored[1]
            if np.array_equal(indices, rows):
                return features
            return np.asarray(features[np.searchsorted(rows, indices)])
        new = np.asarray(compute(missing), np.float32)
        if stored is not None and new.shape[1] != stored[1].shape[1]:
            raise ValueError(f"computed {new.shape[1]}-d features; the cache holds "
                             f"{stored[1].shape[1]}-d ones")
        merged_rows = np.union1d(rows, missing)
        merged = np.empty((len(merged_rows), new.shape[1]), np.float32)
        merged[np.searchsorted(merged_rows, missing)] = new
        if stored is not None and len(rows):
            merged[np.searchsorted(merged_rows, rows)] = stored[1]
        self._write(split, merged_rows, merged)
        if np.array_equal(indices, merged_rows):
            return merged
        return merged[np.searchsorted(merged_rows, indices)]

    def _write(self, split: str, rows: np.ndarray, features: np.ndarray) -> None:
        if not self.writer:
            return
        try:
            files.makedirs(self.folder)
            token = secrets.token_hex(4)
            entry = {"features": f"{split}-{token}.npy", "rows": f"{split}-{token}-rows.npy",
                     "count": int(len(rows)), "dim": int(features.shape[1])}
            _save(files.join(self.folder, entry["rows"]), rows)
            _save(files.join(self.folder, entry["features"]), features)
            manifest = {**self.manifest, "fingerprint": self.key, "what": self.what,
                        "splits": {**self.manifest["splits"], split: entry}}
            files.write_text(files.join(self.folder, "manifest.json"),
                             json.dumps(manifest, indent=1))
            self.manifest = manifest
            keep = {"manifest.json"} | {name for e in manifest["splits"].values()
                                        for name in (e["features"], e["rows"])}
            for name in files.listdir(self.folder):
                if name not in keep and name.endswith(".npy"):
                    files.remove(files.join(self.folder, name))
        except OSError as e:  # a full disk or a read-only workdir: evaluate without the cache
            self.say(f"cannot write the feature cache in {self.folder} ({e}); continuing "
                     "without it")
