"""One JSON line summing up a training run from its metrics.jsonl: the kNN curve, the best and
the last kNN top-1, and the loop's images/s (what BENCHMARKS.md's quality rows quote).

    python benchmarks/run_summary.py runs/simclr_cifar10_5min [--name simclr_5min] \
        [--wall-s 297.4] [--rc 0]

--wall-s and --rc are the whole command's wall-clock seconds and exit status, measured by the
caller (benchmarks/gpu_suite.sh); a run stopped by a timeout still has its curve up to there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def summarize(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
    knn = [(r["step"], round(r.get("epoch", 0.0), 3), r["eval/knn_top1"])
           for r in records if "eval/knn_top1" in r]
    rates = [r["train/images_per_sec"] for r in records if "train/images_per_sec" in r]
    best = max(knn, key=lambda x: x[2]) if knn else None
    last = records[-1] if records else {}
    return {
        "last_step": last.get("step"), "last_epoch": round(last.get("epoch", 0.0), 3),
        "knn_curve": [[epoch, round(top1, 4)] for _, epoch, top1 in knn],
        "best_knn_top1": round(best[2], 4) if best else None,
        "best_epoch": best[1] if best else None,
        "last_knn_top1": round(knn[-1][2], 4) if knn else None,
        "median_images_per_s": round(statistics.median(rates), 1) if rates else None,
        "last_loss": round(last["train/loss"], 4) if "train/loss" in last else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--name", default=None)
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--rc", type=int, default=None)
    args = p.parse_args()
    row = {"run": args.name or os.path.basename(os.path.normpath(args.workdir))}
    if args.rc is not None:
        row["rc"] = args.rc
    if args.wall_s is not None:
        row["wall_s"] = round(args.wall_s, 1)
    row.update(summarize(args.workdir))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
