"""Time the kNN monitor on an ImageNet-sized bank: knn_scores over every device there is.

The bank (pseudo-random features, generated on the devices, split over the mesh's data axis as the
trainer's would be) defaults to ImageNet's train set as a ResNet-50 sees it: 1,281,167 x 2048.

    python benchmarks/knn_scale.py                                 # 1.28M x 2048, float32
    python benchmarks/knn_scale.py --bank-dtype bfloat16           # that bank in half the memory
    python benchmarks/knn_scale.py --dim 128 --queries 1000        # what a 2-core CPU finishes

Prints one JSON line: the bank's size in GB (as stored), the time of one knn_scores call after
a warm-up call that compiles, queries/s, bank rows compared per second, the compiled program's
working memory per device (XLA's temp allocation: independent of the bank's size), and the
peak device memory where the backend reports it (GPU, TPU; not the CPU, where the process's
peak resident memory during the kNN calls, the bank included, is given instead).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _random_features(*, n, d, dtype):
    """[n, d] features uniform in [-1, 1) from an integer hash of (row, column).

    Not jax.random: its generator holds several bank-sized temporaries (4x the bank on the CPU),
    which would dominate the peak memory this benchmark reports; one fused elementwise hash holds
    none.
    """
    import jax.numpy as jnp

    def mix(h):  # the murmur3 finaliser: every input bit reaches every output bit
        h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
        h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
        return h ^ (h >> 16)

    rows = jnp.arange(n, dtype=jnp.uint32)[:, None]
    cols = jnp.arange(d, dtype=jnp.uint32)[None, :]
    h = mix(mix(rows * jnp.uint32(0x9E3779B9)) ^ cols)
    return ((h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0).astype(dtype)


def _reset_host_peak() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_peak_gb() -> float:
    """The process's peak resident memory in GB (since the last reset, on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=1281167, help="bank rows (ImageNet train: 1281167)")
    p.add_argument("--dim", type=int, default=2048, help="feature size (ResNet-50: 2048)")
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--chunk-size", type=int, default=256, help="queries per step")
    p.add_argument("--bank-chunk-size", type=int, default=65536,
                   help="bank rows per step and device")
    p.add_argument("--bank-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed calls after the warm-up; the fastest counts")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxssl import parallel
    from jaxssl.evaluate import knn

    mesh = parallel.make_mesh()
    n_dev = mesh.shape[parallel.DATA_AXIS]
    dtype = jnp.dtype(args.bank_dtype)
    # Generated where it will live, already split and in the storage dtype, so the benchmark
    # needs neither a host copy of the bank nor a cast. A jax.Array can only be split into equal
    # row blocks, so on several devices the row count is rounded up to a multiple of them.
    n = -(-args.bank // n_dev) * n_dev
    if n != args.bank:
        print(f"note: {args.bank} rows rounded up to {n} to split over {n_dev} devices",
              file=sys.stderr)
    make = jax.jit(functools.partial(_random_features, n=n, d=args.dim, dtype=dtype),
                   out_shardings=parallel.data_sharded(mesh))
    bank = make()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, n).astype(np.int32)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    bank.block_until_ready()

    # On the CPU the devices' memory is the process's: restart the kernel's resident-memory
    # high-water mark here, so the figure below is knn_scores' peak, not the generator's.
    host_peak_reset = _reset_host_peak()
    kw = dict(num_classes=args.classes, k=args.k, chunk_size=args.chunk_size,
              bank_chunk_size=args.bank_chunk_size, bank_dtype=dtype, mesh=mesh)
    t0 = time.perf_counter()
    knn.knn_scores(bank, labels, queries, **kw)  # compiles
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = knn.knn_scores(bank, labels, queries, **kw)
        times.append(time.perf_counter() - t0)
    best = min(times)
    host_peak_gb = _host_peak_gb()
    assert scores.shape == (args.queries, args.classes) and np.isfinite(scores).all()

    # The program knn_scores ran, compiled once more only to ask XLA for its memory.
    placed = knn._place_bank(bank, mesh, dtype)
    program = knn._program(mesh, n_valid=n, k=args.k, num_classes=args.classes,
                           temperature=0.1, chunk=min(args.chunk_size, args.queries),
                           bank_chunk=args.bank_chunk_size)
    labels_placed = jax.device_put(np.zeros(placed.shape[0], np.int32), parallel.data_sharded(mesh))
    memory = program.lower(jax.device_put(queries, parallel.replicated(mesh)), placed,
                           labels_placed).compile().memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "devices": f"{n_dev} x {jax.devices()[0].device_kind}",
        "bank": [n, args.dim], "bank_dtype": args.bank_dtype,
        "bank_gb": round(n * args.dim * dtype.itemsize / 1e9, 3),
        "queries": args.queries, "k": args.k, "chunk_size": args.chunk_size,
        "bank_chunk_size": args.bank_chunk_size,
        "warmup_s": round(warmup_s, 2), "time_s": round(best, 3),
        "times_s": [round(t, 3) for t in times],
        "queries_per_s": round(args.queries / best, 1),
        "similarities_per_s": float(f"{args.queries * n / best:.3g}"),
        "working_memory_mb_per_device":
            round(memory.temp_size_in_bytes / 1e6, 1) if memory else None,
        "peak_device_memory_gb":
            round(stats["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in stats else None,
        "peak_host_rss_gb": host_peak_gb,
        "peak_host_rss_is_knn_only": host_peak_reset,
        "jax": jax.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
