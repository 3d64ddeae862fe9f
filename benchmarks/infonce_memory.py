"""Peak memory and time of InfoNCE's forward + backward: info_nce against info_nce_blockwise.

For 2N views of dimension D on one device (the whole global batch on it), times one jitted
value-and-gradient with respect to both views after a warm-up call, and reports its memory:
XLA's compiled temporary allocation (`memory_analysis().temp_size_in_bytes`, every backend) and,
where the backend keeps one (GPU, TPU), the device's peak bytes in use. Each measurement runs in
its own process, so the peak is that measurement's alone and an out-of-memory error (expected for
the plain loss from about 128k views on an 80-140 GB GPU: its logits alone are 2N x 2N float32)
is recorded as "OOM" without disturbing the others.

    python benchmarks/infonce_memory.py                        # 8k ... 128k views, D 128
    python benchmarks/infonce_memory.py --views 65536 --impl blockwise --block-size 8192
    python benchmarks/infonce_memory.py --tiny                 # CPU smoke run, seconds

Prints one JSON line per measurement (impl, views, dim, block_size, status "ok" / "OOM" /
"timeout" / "error: ...", step_ms median and min, temp_bytes, peak_bytes, host_peak_rss_bytes,
loss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VIEWS = (8192, 16384, 32768, 65536, 131072)  # 2N
TINY_VIEWS = (512, 2048)
TEMPERATURE = 0.1


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text


def measure(impl: str, views: int, dim: int, block_size: int, repeats: int) -> dict:
    """One measurement in this process: a dict for the JSON line."""
    import functools

    import jax
    import numpy as np

    from jaxssl import losses

    device = jax.devices()[0]
    row = {"impl": impl, "views": views, "dim": dim,
           "block_size": block_size if impl == "blockwise" else None,
           "device": device.device_kind, "jax": jax.__version__}
    if impl == "plain":
        loss_fn = functools.partial(losses.info_nce, temperature=TEMPERATURE)
    else:
        loss_fn = functools.partial(losses.info_nce_blockwise, temperature=TEMPERATURE,
                                    block_size=block_size)
    n = views // 2
    try:
        z1, z2 = jax.jit(lambda k: jax.random.normal(k, (2, n, dim)))(jax.random.key(0))
        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
        compiled = step.lower(z1, z2).compile()
        analysis = compiled.memory_analysis()
        row["temp_bytes"] = None if analysis is None else int(analysis.temp_size_in_bytes)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(z1, z2))  # warm-up
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss, grads = compiled(z1, z2)
            jax.block_until_ready((loss, grads))
            times.append(time.perf_counter() - t0)
        row.update(status="ok", step_ms=round(1000 * statistics.median(times), 3),
                   step_ms_min=round(1000 * min(times), 3), loss=float(np.asarray(loss)))
    except Exception as e:  # noqa: BLE001 - recorded in the line, the next measurement goes on
        row["status"] = "OOM" if _is_oom(e) else "error: " + str(e).splitlines()[0][:200]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    row["peak_bytes"] = (stats or {}).get("peak_bytes_in_use")
    # This process's peak resident memory (Linux reports KiB): on the CPU, where the arrays live
    # in host memory, the stand-in for device memory (it includes the ~0.3-0.5 GB of jax itself).
    row["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", type=int, nargs="+", help=f"2N values (default {VIEWS})")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--impl", choices=["plain", "blockwise", "both"], default="both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU smoke run: views {TINY_VIEWS}, block 256, 2 repeats")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.tiny:
        args.views = args.views or list(TINY_VIEWS)
        args.block_size, args.repeats = 256, 2
    views = args.views or list(VIEWS)
    impls = ["plain", "blockwise"] if args.impl == "both" else [args.impl]
    if args.one:
        print(json.dumps(measure(impls[0], views[0], args.dim, args.block_size, args.repeats)),
              flush=True)
        return
    for v in views:
        if v % 2:
            raise SystemExit(f"--views counts both views of every image: use even numbers; got {v}")
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--impl", impl, "--views",
                   str(v), "--dim", str(args.dim), "--block-size", str(args.block_size),
                   "--repeats", str(args.repeats)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if lines:
                    row = json.loads(lines[-1])
                else:
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    status = "OOM" if _is_oom(Exception(done.stderr)) else f"error: {tail[:200]}"
                    row = {"impl": impl, "views": v, "dim": args.dim, "status": status,
                           "exit_code": done.returncode}
                sys.stderr.write(done.stderr[-2000:])
            except subprocess.TimeoutExpired:
                row = {"impl": impl, "views": v, "dim": args.dim, "status": "timeout",
                       "timeout_s": args.timeout}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
