"""Throughput of the two-view input pipeline: jaxssl's tf.data host path, its device
augmentation run on the CPU, and torchvision's standard SimCLR transform through a PyTorch
DataLoader, on the same machine and cores.

An image counts once when both its views have been delivered in a batch.

    python benchmarks/pipeline_throughput.py                # everything, 1 and 2 threads
    python benchmarks/pipeline_throughput.py --quick        # fewer images (smoke test)

Data: CIFAR-10 from ../shared/data/cifar10/cifar10_jpeg.npz (32 px, decoded to memory first)
and a folder of JPEG files (CIFAR-10 images upscaled to 320x320, quality 90, written to a
temporary folder) cropped to 224 px. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
NPZ = os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10_jpeg.npz")


def _emit(**row):
    print(json.dumps(row), flush=True)


def _jpeg_folder(images: np.ndarray, side: int, directory: str) -> str:
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).resize((side, side), Image.BILINEAR).save(
            os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    return directory


def bench_jaxssl_host(source, out_size, recipe_name, threads, n_images, batch):
    from jaxssl.data import pipeline, recipes

    it = pipeline.make_pipeline(source, global_batch=batch, seed=0, mode="host",
                                recipe=recipes.get_recipe(recipe_name), out_size=out_size,
                                threads=threads)
    next(it)  # graph construction and the first batch are start-up, not throughput
    steps = max(1, n_images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def bench_jaxssl_device_on_cpu(images, out_size, recipe_name, n_images, batch):
    import jax

    from jaxssl.data import augment_jax, recipes

    aug = jax.jit(augment_jax.make_device_augment(recipes.get_recipe(recipe_name), out_size,
                                                  (0.5,) * 3, (0.25,) * 3))
    keys = jax.random.split(jax.random.key(0), batch)
    x = images[:batch]
    jax.block_until_ready(aug(x, keys))
    steps = max(1, n_images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = aug(x, keys)
    jax.block_until_ready(out)
    return steps * batch / (time.perf_counter() - t0)


def bench_torchvision(files_or_images, out_size, strength, blur, threads, n_images, batch):
    import torch
    from PIL import Image
    from torchvision import transforms as T

    torch.set_num_threads(1)
    jitter = T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    ops = [T.RandomResizedCrop(out_size), T.RandomHorizontalFlip(), T.RandomApply([jitter], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        k = 2 * int(0.1 * out_size / 2) + 1
        ops.append(T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5))
    ops += [T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]
    transform = T.Compose(ops)

    class TwoViews(torch.utils.data.Dataset):
        def __len__(self):
            return len(files_or_images)

        def __getitem__(self, i):
            item = files_or_images[i]
            img = Image.open(item).convert("RGB") if isinstance(item, str) else Image.fromarray(item)
            return transform(img), transform(img)

    loader = torch.utils.data.DataLoader(
        TwoViews(), batch_size=batch, shuffle=True, num_workers=threads, drop_last=True,
        persistent_workers=True, prefetch_factor=4)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    steps = max(1, min(n_images, len(files_or_images) - 2 * batch) // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def torch_measurements(folder, threads_list, n32, n224):
    """torchvision's numbers, in a process of their own: a forked DataLoader worker in a process
    that has TensorFlow loaded crashes, and each framework should get the cores to itself."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        _emit(pipeline="torchvision DataLoader", result="pending: torch/torchvision not installed")
        return
    from jaxssl.data import sources

    base = dict(cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    cifar = sources.load_cifar10_npz(NPZ, "train")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    for threads in threads_list:
        r = bench_torchvision(cifar.images[:n32 + 512], 32, 0.5, False, threads, n32, 256)
        _emit(pipeline="torchvision DataLoader", data="cifar10 32px", threads=threads,
              images_per_s=round(r, 1), **base)
        r = bench_torchvision(files, 224, 1.0, True, threads, n224, 32)
        _emit(pipeline="torchvision DataLoader", data="jpeg files 320px -> 224", threads=threads,
              images_per_s=round(r, 1), **base)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-only", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]
    n32, n224 = (1024, 128) if args.quick else (8192, 512)
    if not os.path.exists(NPZ):
        sys.exit(f"CIFAR-10 not found at {NPZ}; see ../shared/data/cifar10/README.md")
    if args.torch_only:
        torch_measurements(args.torch_only, threads_list, n32, n224)
        return
    from jaxssl.data import sources

    cifar = sources.load_cifar10_npz(NPZ, "train")
    base = dict(cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"))

    for threads in threads_list:
        r = bench_jaxssl_host(cifar, 32, "simclr_cifar", threads, n32, 256)
        _emit(pipeline="jaxssl tf.data host", data="cifar10 32px", threads=threads,
              images_per_s=round(r, 1), **base)
    r = bench_jaxssl_device_on_cpu(cifar.images, 32, "simclr_cifar", n32 // 2, 256)
    _emit(pipeline="jaxssl device augmentation on CPU (jit)", data="cifar10 32px", threads="xla",
          images_per_s=round(r, 1), **base)

    with tempfile.TemporaryDirectory() as tmp:
        _jpeg_folder(cifar.images[:n224 + 64], 320, tmp)
        folder = sources.load_folder(tmp, labelled=False)
        for threads in threads_list:
            r = bench_jaxssl_host(folder, 224, "simclr", threads, n224, 32)
            _emit(pipeline="jaxssl tf.data host", data="jpeg files 320px -> 224", threads=threads,
                  images_per_s=round(r, 1), **base)
        if not args.skip_torch:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-only", tmp,
                            "--threads", args.threads] + (["--quick"] if args.quick else []),
                           check=True)


if __name__ == "__main__":
    main()
