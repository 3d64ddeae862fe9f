"""benchmarks/trace_summary.py: busy time as the union of a track's events, per-name sums,
kinds, and only device tracks when a device process is named."""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import trace_summary  # noqa: E402


def _trace():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #14"}},
    ]
    x = lambda name, ts, dur, pid=2: {"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": ts,
                                      "dur": dur}
    return meta + [
        x("sm90_xmma_fprop_implicit_gemm", 0, 10),
        x("input_reduce_fusion", 5, 10),     # overlaps the first: union 0..15
        x("sm90_xmma_fprop_implicit_gemm", 20, 10),
        x("loop_add_fusion", 40, 5),         # gap 30..40
        x("python", 0, 1000, pid=1),         # a host event: left out
    ]


def test_summary_of_a_device_track(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    rows = trace_summary.summarize(trace_summary.load(str(path)))
    assert len(rows) == 1  # the host process is not a device
    r = rows[0]
    assert (r["process"], r["thread"], r["events"]) == ("/device:GPU:0", "Stream #14", 4)
    assert r["busy_us"] == 15 + 10 + 5 and r["span_us"] == 45 and r["sum_us"] == 35
    top = {t["name"]: (t["count"], t["us"]) for t in r["top"]}
    assert top["sm90_xmma_fprop_implicit_gemm"] == (2, 20.0)
    assert r["categories"] == {"convolution/matmul": round(20 / 35, 4), "reduction": round(10 / 35, 4),
                               "other (fusions)": round(5 / 35, 4)}
