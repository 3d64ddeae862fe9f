"""Start-up of the input pipeline: from a fresh process to its first batch, and its peak memory,
for record shards (`jaxssl prepare`) against an image folder read by `load_folder`.

    python benchmarks/records_startup.py                       # 200,000 JPEGs, a 1.28M index
    python benchmarks/records_startup.py --images 20000 --big 128000 --repeats 1   # smaller

Setup (timed and printed, not part of start-up; kept under --data for the next call):
  1. a folder of --images small JPEGs (64 x 64, textured, 4 class subfolders);
  2. `records.prepare` of that folder;
  3. a records directory whose index lists --big records: the shards of step 2 hard-linked
     under new names as often as needed, the index arrays repeated (a valid dataset for
     `Records`: counts, sizes and CRC-32s agree).
Then, --repeats times, one fresh process per case: (a) the records of step 2, (b) those of
step 3, (c) `load_folder` on the folder of step 1. Each process imports jaxssl's data stack and
TensorFlow, opens its source, calls `make_pipeline` (mode "host", the `simclr` recipe, 224 px,
batch 256; no JAX compilation is involved) and takes one batch. Its line gives the seconds from
the parent's launch to the first batch (Python start-up included) with the parts, its peak
resident memory, and what of the data files was in the OS page cache before it started
(`fincore`; nothing is dropped from the cache). Prints one JSON line per setup step and
measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from pipeline_throughput import _emit  # noqa: E402

CLASSES = 4


# ----------------------------------------------------------------------------- test images

def textured_image(seed: tuple[int, ...], height: int, width: int, detail: float) -> np.ndarray:
    """uint8 [height, width, 3]: smooth colour fields at several scales plus pixel noise, so a
    JPEG of it is about as large as one of a photo of that size (detail scales the noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 0.5), (12, 0.3), (48, 0.2)):
        grid = (rng.random((max(2, cells * height // width), cells, 3)) * 255).astype(np.uint8)
        out += amplitude * np.asarray(Image.fromarray(grid).resize((width, height),
                                                                    Image.BICUBIC), np.float32)
    out += rng.normal(0.0, detail, (height, width, 1)) + rng.normal(0.0, detail / 3,
                                                                     (height, width, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def _write_images(job):
    folder, start, stop, height, width, detail, quality = job
    from PIL import Image

    total = 0
    for i in range(start, stop):
        path = os.path.join(folder, f"class{i % CLASSES}", f"{i:07d}.jpg")
        Image.fromarray(textured_image((7, i), height, width, detail)).save(path, quality=quality)
        total += os.path.getsize(path)
    return total


def textured_jpegs(folder: str, count: int, *, height: int, width: int, detail: float,
                   quality: int, workers: int) -> dict:
    """Writes `count` textured JPEGs into CLASSES subfolders of `folder` (reused if complete).
    Returns a setup row: seconds, files, bytes."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        with open(done) as f:
            row = json.load(f)
        if row["files"] == count and row["size"] == [height, width]:
            return dict(row, reused=True)
        shutil.rmtree(folder)
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"class{c}"), exist_ok=True)
    t0 = time.perf_counter()
    step = 2000
    jobs = [(folder, s, min(count, s + step), height, width, detail, quality)
            for s in range(0, count, step)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        total = sum(pool.imap_unordered(_write_images, jobs))
    row = dict(files=count, size=[height, width], quality=quality, bytes=total,
               mean_kb=round(total / count / 1024, 1),
               seconds=round(time.perf_counter() - t0, 1), workers=workers)
    with open(done, "w") as f:
        json.dump(row, f)
    return dict(row, reused=False)


# ----------------------------------------------------------------------------- records setup

def prepare_records(folder: str, output: str, workers: int) -> dict:
    from jaxssl.data import records

    if records.is_records_dir(output):
        return dict(reused=True, count=records.Records(output).num_examples)
    t0 = time.perf_counter()
    info = records.prepare(folder, output, workers=workers, say=lambda s: None)
    return dict(reused=False, count=info["count"], shards=len(info["shards"]),
                bytes=sum(s["bytes"] for s in info["shards"]),
                seconds=round(time.perf_counter() - t0, 1), workers=workers)


def repeated_index(small: str, big: str, count: int) -> dict:
    """A records directory at `big` listing `count` records: the full shards of `small`
    hard-linked under the names of a dataset of `count` records, in turn, with their index
    entries (offset, length, CRC-32, label) repeated. `Records(big)` checks it like any other."""
    from jaxssl.data import records

    if records.is_records_dir(big):
        return dict(reused=True, count=records.Records(big).num_examples)
    t0 = time.perf_counter()
    src = records.Records(small)
    size = src.info["shard_size"]
    full = [i for i, s in enumerate(src.info["shards"]) if s["count"] == size]
    n = math.ceil(count / size)
    if os.path.exists(big):
        shutil.rmtree(big)
    os.makedirs(big)
    shards, parts = [], {k: [] for k in ("shard", "offset", "length", "crc", "label")}
    for j in range(n):
        k = full[j % len(full)]
        rows = np.flatnonzero(src.shard == k)[:min(size, count - j * size)]
        name = records.shard_name(j, n)
        meta = src.info["shards"][k]
        os.link(os.path.join(small, meta["name"]), os.path.join(big, name))
        shards.append(dict(name=name, count=len(rows), bytes=meta["bytes"],
                           sha256=meta["sha256"]))
        parts["shard"].append(np.full(len(rows), j, np.int32))
        for key, values in (("offset", src.offset), ("length", src.length), ("crc", src.crc),
                            ("label", src.labels)):
            parts[key].append(values[rows])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    np.savez(os.path.join(big, records.INDEX_ARRAYS), **arrays)
    info = dict(src.info, count=int(len(arrays["shard"])), shards=shards, skipped=[],
                input_count=int(len(arrays["shard"])),
                source=f"synthetic: {small} repeated to {count} records",
                content_sha256="synthetic")
    with open(os.path.join(big, records.INDEX_JSON), "w") as f:
        json.dump(info, f, indent=1)
    check = records.Records(big)
    probe = np.random.default_rng(0).choice(check.num_examples, 256, replace=False)
    check.read(probe)  # CRC-checked and decoded
    return dict(reused=False, count=check.num_examples, shards=n, linked_from=len(full),
                seconds=round(time.perf_counter() - t0, 1))


# ----------------------------------------------------------------------------- measurement

def page_cache(paths: list[str]) -> dict:
    """How much of `paths` the OS page cache holds now (util-linux fincore)."""
    if not paths or shutil.which("fincore") is None:
        return {"cached": "unknown"}
    res = size = 0
    page = os.sysconf("SC_PAGE_SIZE")  # fincore counts whole pages
    for i in range(0, len(paths), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE"]
                             + paths[i:i + 500], capture_output=True, text=True).stdout
        for line in out.split("\n"):
            if line.strip():
                r, s = line.split()
                res, size = res + int(r), size + -(-int(s) // page) * page
    return {"files_checked": len(paths), "cached_fraction": round(res / max(size, 1), 3)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_status() -> dict:
    """This process's peak and current resident memory in MB, the current split into anonymous
    memory and mapped file pages (record shards read through a memory map count as the latter:
    page cache the OS can reclaim, not memory the process allocated)."""
    fields = {"VmHWM": "peak_rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = round(int(value.split()[0]) / 1024)
    return out


def measure(kind: str, path: str, launched: float, batch: int, out_size: int,
            threads: int | None) -> dict:
    """In a fresh process: imports, the source, make_pipeline and one batch."""
    started = time.time()
    from jaxssl.data import pipeline, recipes, sources
    from jaxssl.data.tf_import import tf

    tf()
    imported = time.time()
    rss_imported = _rss_mb()
    source = sources.load_records(path) if kind.startswith("records") else \
        sources.load_folder(path)
    opened = time.time()
    rss_opened = _rss_mb()
    it = pipeline.make_pipeline(source, global_batch=batch, seed=0, mode="host",
                                recipe=recipes.get_recipe("simclr"), out_size=out_size,
                                threads=threads)
    first = next(it)
    done = time.time()
    shape = list(first["views"][0].shape)
    it.close()
    return dict(case=kind, examples=source.num_examples, batch_shape=shape,
                images_in_memory=source.images is not None,
                start_to_first_batch_s=round(done - launched, 2),
                python_start_s=round(started - launched, 2),
                imports_s=round(imported - started, 2), source_s=round(opened - imported, 2),
                first_batch_s=round(done - opened, 2),
                **memory_status(), rss_after_imports_mb=round(rss_imported),
                source_rss_mb=round(rss_opened - rss_imported))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/jaxssl_records_bench")
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--big", type=int, default=1_280_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="tf.data threads (default: tf's)")
    p.add_argument("--cases", default="records,records_big,folder")
    p.add_argument("--measure", nargs=3, metavar=("CASE", "PATH", "LAUNCHED"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        case, path, launched = args.measure
        _emit(**measure(case, path, float(launched), args.batch, args.out_size, args.threads))
        return

    base = dict(cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    folder = os.path.join(args.data, f"folder{args.images}")
    recs = os.path.join(args.data, f"records{args.images}")
    big = os.path.join(args.data, f"records{args.images}x{args.big}")
    workers = os.cpu_count() or 1
    _emit(setup="generate folder", path=folder, **textured_jpegs(
        folder, args.images, height=64, width=64, detail=24.0, quality=90, workers=workers),
        **base)
    _emit(setup="prepare records", path=recs, **prepare_records(folder, recs, workers), **base)
    _emit(setup="repeated index", path=big, **repeated_index(recs, big, args.big), **base)

    from jaxssl.data import records

    shard_paths = [os.path.join(recs, s["name"]) for s in records.Records(recs).info["shards"]]
    every = max(1, args.images // 2000)
    folder_paths = [os.path.join(folder, f"class{i % CLASSES}", f"{i:07d}.jpg")
                    for i in range(0, args.images, every)]
    cases = {"records": (recs, shard_paths), "records_big": (big, shard_paths),
             "folder": (folder, folder_paths)}
    for repeat in range(args.repeats):
        for case in args.cases.split(","):
            path, data_files = cases[case]
            cache = page_cache(data_files)
            cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
                   "--out-size", str(args.out_size)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd + ["--measure", case, path, repr(time.time())],
                                  capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
            if done.returncode or not lines:
                _emit(case=case, repeat=repeat, error=done.stderr.strip().splitlines()[-3:],
                      **base)
                continue
            _emit(**json.loads(lines[-1]), repeat=repeat, page_cache_before=cache, **base)


if __name__ == "__main__":
    main()
