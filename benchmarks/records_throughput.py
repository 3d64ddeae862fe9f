"""Throughput per core of the 224 px two-view input: jaxssl's tf.data from record shards and
from an image folder, torchvision's DataLoader, and a Grain pipeline over the same records.

    python benchmarks/records_throughput.py                        # 3000 photos, 1 and 2 cores
    python benchmarks/records_throughput.py --repeats 1 --seconds 8 --images 600   # smoke test

Data (setup, kept under --data): --images textured JPEGs of 500 x 375 (about ImageNet's mean
size; quality 90, about 100 KB each, 4 class folders), and `records.prepare` of that folder.

Cases, each in a fresh process pinned to the first N cores (`sched_setaffinity`, which its
threads and worker processes inherit), N in --cores, with N threads or workers:
  records_host, records_split, folder_host, folder_split: `make_pipeline` with
      `recipes.get_recipe("simclr")` at 224 px, mode "host" (all augmentation in tf.data) or
      "split" (crop and flip in tf.data; colour and blur left to the device), from
      `sources.load_records` or `sources.load_folder` (its start-up decode is not timed);
  torchvision: `pipeline_throughput.bench_torchvision` (RandomResizedCrop(224), flip,
      ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, GaussianBlur(23, (0.1, 2)) p 0.5,
      ToTensor, Normalize; two views; files opened as ImageFolder's loader does) in the
      --torch-python interpreter, DataLoader num_workers = N;
  grain: `grain.DataLoader` over `records.Records` (random access by index) with
      worker_count = N: Pillow decodes (with `Image.draft`, DCT downscaling, when both crops
      allow it), RandomResizedCrop's rule draws two crops, each resized to 224 and flipped
      with p 0.5: uint8 views, the work of mode "split"; in the --grain-python interpreter.
An image counts once both its views are in a delivered batch; after two warm-up batches the
timing runs --seconds (torchvision: a fixed count of images near that). Then a determinism
check: the first batches of two pipelines made with the same seed, compared bit for bit
(and those of another seed, which must differ), for tf.data and Grain.
Prints one JSON line per setup step and measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from pipeline_throughput import _emit  # noqa: E402

OUT_SIZE = 224
JAXSSL_CASES = ("records_host", "records_split", "folder_host", "folder_split")
# torchvision's rate on this kind of machine (pipeline_throughput: ~15 images/s per worker at
# 224 px) sizes its fixed image count to about --seconds.
TORCH_IMAGES_PER_S_PER_CORE = 15


# ----------------------------------------------------------------------------- cases

def _timed(it, batch: int, seconds: float, warmup: int = 2) -> tuple[float, int]:
    """(images/s, batches timed) of an iterator of batches, after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while True:
        next(it)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            return n * batch / elapsed, n


def jaxssl_pipeline(case: str, path: str, batch: int, threads: int, seed: int = 0):
    from jaxssl.data import pipeline, recipes, sources

    kind, mode = case.split("_")
    source = sources.load_records(path) if kind == "records" else \
        sources.load_folder(path, labelled=False)
    return pipeline.make_pipeline(source, global_batch=batch, seed=seed, mode=mode,
                                  recipe=recipes.get_recipe("simclr"), out_size=OUT_SIZE,
                                  threads=threads)


def _crop_box(rng, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params with a numpy Generator: (y0, x0, h, w)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * r))), int(round(np.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    r = width / height
    if r < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif r > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pillow_two_crops(data: bytes, rng, out_size: int = OUT_SIZE) -> dict:
    """Decode (DCT-downscaled by Image.draft where both crops stay >= out_size), two random
    resized crops, each flipped with p 0.5: {"v1", "v2"} uint8 [out_size, out_size, 3]."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    width, height = im.size
    boxes = [_crop_box(rng, height, width) for _ in range(2)]
    flips = rng.random(2) < 0.5
    smallest = min(min(h, w) for _, _, h, w in boxes)
    reduce = max(s for s in (1, 2, 4, 8) if s == 1 or smallest // s >= out_size)
    if reduce > 1:
        im.draft("RGB", (-(-width // reduce), -(-height // reduce)))
    im = im.convert("RGB")
    sx, sy = im.size[0] / width, im.size[1] / height
    views = {}
    for name, (y0, x0, h, w), flip in zip(("v1", "v2"), boxes, flips):
        v = im.resize((out_size, out_size), Image.BILINEAR,
                      box=(x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy))
        if flip:
            v = v.transpose(Image.FLIP_LEFT_RIGHT)
        views[name] = np.asarray(v)
    return views


def grain_loader(path: str, batch: int, workers: int, seed: int = 0):
    import grain

    from jaxssl.data import records

    class RecordsSource:
        """grain's RandomAccessDataSource protocol over records.Records (pickled into workers:
        Records reopens its shards there)."""

        def __init__(self):
            self.records = records.Records(path)

        def __len__(self):
            return self.records.num_examples

        def __getitem__(self, i):
            return self.records.read_bytes([int(i)])[0]

    class TwoCrops(grain.transforms.RandomMap):
        def random_map(self, element, rng):
            return pillow_two_crops(element, rng)

    source = RecordsSource()
    sampler = grain.samplers.IndexSampler(len(source), shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=None, seed=seed)
    loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=workers,
                              operations=[TwoCrops(),
                                          grain.transforms.Batch(batch, drop_remainder=True)])
    return iter(loader)


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        views = b["views"] if "views" in b else (b["v1"], b["v2"])
        for v in views:
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def determinism(make, batches: int = 3) -> dict:
    """Digests of the first batches of make(seed) for seeds 0, 0, 1."""
    digests = []
    for seed in (0, 0, 1):
        it = make(seed)
        digests.append(_digest(next(it) for _ in range(batches)))
        close = getattr(it, "close", None)
        if close:
            close()
        del it
    return dict(batches_compared=batches, same_seed_equal=digests[0] == digests[1],
                other_seed_differs=digests[0] != digests[2], digests=digests)


def measure(case: str, path: str, cores: int, batch: int, seconds: float) -> dict:
    """Runs in a fresh process, already pinned to `cores` cores."""
    row = dict(case=case, cores=cores, batch=batch)
    if case in JAXSSL_CASES:
        from jaxssl.data.tf_import import tf

        tf()
        it = jaxssl_pipeline(case, path, batch, threads=cores)
        rate, n = _timed(it, batch, seconds)
        it.close()
    elif case == "grain":
        it = grain_loader(path, batch, cores)
        rate, n = _timed(it, batch, seconds)
    elif case == "torchvision":
        from pipeline_throughput import bench_torchvision

        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith(".jpg"))
        n_images = max(4, round(TORCH_IMAGES_PER_S_PER_CORE * cores * seconds / batch)) * batch
        rate = bench_torchvision(files, OUT_SIZE, 1.0, True, cores, n_images, batch)
        n = n_images // batch
        import torch
        import torchvision

        row.update(torch=torch.__version__, torchvision=torchvision.__version__)
    elif case == "determinism_tfdata":
        from jaxssl.data.tf_import import tf

        tf()
        for mode in ("records_split", "records_host"):
            row[mode] = determinism(lambda s: jaxssl_pipeline(mode, path, batch, cores, seed=s))
        return row
    elif case == "determinism_grain":
        row["grain"] = determinism(lambda s: grain_loader(path, batch, cores, seed=s))
        return row
    else:
        raise ValueError(case)
    from records_startup import memory_status

    return dict(row, images_per_s=round(rate, 1), images_per_s_per_core=round(rate / cores, 1),
                batches_timed=n, **memory_status())


# ----------------------------------------------------------------------------- driver

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/jaxssl_records_bench")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--cores", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cases", default=",".join(JAXSSL_CASES + ("torchvision", "grain")))
    p.add_argument("--torch-python", default="/tmp/torchenv/bin/python")
    p.add_argument("--grain-python", default="/tmp/grainenv/bin/python")
    p.add_argument("--no-determinism", action="store_true")
    p.add_argument("--measure", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        case, path = args.measure
        cores = int(args.cores)
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
        _emit(**measure(case, path, cores, args.batch, args.seconds))
        return

    from records_startup import prepare_records, textured_jpegs

    base = dict(cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    folder = os.path.join(args.data, f"photos{args.images}")
    recs = os.path.join(args.data, f"photos{args.images}.records")
    workers = os.cpu_count() or 1
    _emit(setup="generate photos", path=folder, **textured_jpegs(
        folder, args.images, height=375, width=500, detail=20.0, quality=90, workers=workers),
        **base)
    _emit(setup="prepare records", path=recs, **prepare_records(folder, recs, workers), **base)

    def run(case: str, cores: int, extra=()):
        python = {"torchvision": args.torch_python, "grain": args.grain_python,
                  "determinism_grain": args.grain_python}.get(case, sys.executable)
        if not os.path.exists(python):
            _emit(case=case, cores=cores, result=f"pending: {python} not found", **base)
            return
        path = folder if case.startswith(("folder", "torch")) else recs
        cmd = [python, os.path.abspath(__file__), "--cores", str(cores), "--batch",
               str(args.batch), "--seconds", str(args.seconds), *extra, "--measure", case, path]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
        if done.returncode or not lines:
            _emit(case=case, cores=cores, error=done.stderr.strip().splitlines()[-5:], **base)
            return
        _emit(**json.loads(lines[-1]), process_s=round(time.perf_counter() - t0, 1), **base)

    cores_list = [int(c) for c in args.cores.split(",")]
    for repeat in range(args.repeats):
        for cores in cores_list:
            for case in args.cases.split(","):
                run(case, cores)
    if not args.no_determinism:
        for case in ("determinism_tfdata", "determinism_grain"):
            run(case, max(cores_list))


if __name__ == "__main__":
    main()
