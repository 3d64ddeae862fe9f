"""Where a jax.profiler trace's device time goes: a Perfetto JSON trace (`jax.profiler.trace(...,
create_perfetto_trace=True)`, as `step_throughput.py --profile` writes) summed per track and name.

    python benchmarks/trace_summary.py runs/profile/jax_r18.trace.json.gz [--top 25] [--json]

For every device track (GPU streams, XLA ops and modules): busy time (the union of its events),
the span from its first event to its last, and the names that take most of the time, with their
counts and share. The busy time over the span of a stream is how full the GPU was kept; a
difference between the XLA-module track's span and the sum of module times is time the host
kept the device waiting between steps.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


# Coarse kinds of device work, by substrings of the kernel or op name (first match wins).
CATEGORIES = (
    # cuDNN convolutions and cuBLAS matmuls (XLA:GPU runs 1x1 convolutions as matmuls, `nvjet`).
    ("convolution/matmul", ("conv", "xmma", "cudnn", "implicit", "wgrad", "dgrad", "fprop",
                            "sm90_", "sm80_", "gemm", "cublas", "nvjet", "dot", "matmul",
                            "cutlass")),
    ("transpose/copy", ("transpose", "copy", "memcpy", "memset", "concatenate", "slice")),
    ("reduction", ("reduce", "reduction", "all-reduce", "allreduce")),
    ("collective", ("nccl", "all-gather", "collective")),
    ("random", ("rng", "threefry", "random")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other (fusions)")


def summarize(events: list[dict], top: int = 25) -> list[dict]:
    """One dict per track of a device process (or of every process, when no device is named):
    process and thread names, events, busy and span microseconds, the top names."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", str(e["pid"]))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    device_pids = {pid for pid, name in procs.items()
                   if any(k in name.lower() for k in ("gpu", "device", "tpu"))}
    tracks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        tracks[(e["pid"], e.get("tid"))].append(e)
    rows = []
    for (pid, tid), evs in sorted(tracks.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        evs.sort(key=lambda e: e["ts"])
        busy, end = 0.0, None
        for e in evs:  # union of intervals
            s, t = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            if end is None or s >= end:
                busy += t - s
                end = t
            elif t > end:
                busy += t - end
                end = t
        span = max(float(e["ts"]) + float(e["dur"]) for e in evs) - float(evs[0]["ts"])
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            by_name[e.get("name", "?")][0] += 1
            by_name[e.get("name", "?")][1] += float(e["dur"])
        total = sum(v[1] for v in by_name.values())
        names = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
        kinds = collections.defaultdict(float)
        for n, (_, t) in by_name.items():
            kinds[category(n)] += t
        rows.append({
            "process": procs.get(pid, str(pid)), "thread": threads.get((pid, tid), str(tid)),
            "events": len(evs), "busy_us": round(busy, 1), "span_us": round(span, 1),
            "sum_us": round(total, 1),
            "categories": {k: round(v / total, 4) for k, v in
                           sorted(kinds.items(), key=lambda kv: -kv[1])} if total else {},
            "top": [{"name": n[:120], "count": c, "us": round(t, 1),
                     "share": round(t / total, 4) if total else 0.0} for n, (c, t) in names],
        })
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tracks", type=int, default=6, help="tracks printed (busiest first)")
    p.add_argument("--json", action="store_true", help="one JSON line per track instead of text")
    args = p.parse_args()
    rows = summarize(load(args.trace), args.top)[: args.tracks]
    if not rows:
        print(f"{args.trace}: no timed events", file=sys.stderr)
        sys.exit(1)
    for r in rows:
        if args.json:
            print(json.dumps(r))
            continue
        print(f"== {r['process']} / {r['thread']}: {r['events']} events, busy "
              f"{r['busy_us'] / 1e3:.2f} ms of a {r['span_us'] / 1e3:.2f} ms span "
              f"({r['busy_us'] / r['span_us']:.1%})" if r["span_us"] else "")
        print("  by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in r["categories"].items()))
        for t in r["top"]:
            print(f"  {t['us'] / 1e3:9.3f} ms {t['share']:6.1%} x{t['count']:<5} {t['name']}")


if __name__ == "__main__":
    main()
