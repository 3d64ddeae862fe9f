"""The linear probe's learning-rate sweep against one call per learning rate.

Times, in fresh processes, on a trained workdir:
- separate: one `jaxssl eval linear` per learning rate with the feature cache off (every call
  encodes the train and eval splits again: jaxssl before the cache);
- separate_cached: the same calls with the cache (the first fills it);
- sweep_cold: one call with eval.linear_lr set to all of them (one vmapped program; the
  features encoded once, into an emptied cache); the classifiers train on the train split less
  the held-out eval.linear_val_fraction;
- sweep_warm: the same call again, every feature read from the cache.

    python benchmarks/linear_sweep.py --workdir W [--lrs 0.01,...] [--epochs 100] [--only MODE]

One JSON line per mode (wall seconds, each call's top-1 and seconds), then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

LRS = "0.003,0.01,0.03,0.1,0.3,1,3,10"


def _call(workdir: str, *overrides: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jaxssl", "eval", "linear", "--workdir", workdir,
                          *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"jaxssl eval linear failed ({out.returncode}):\n{out.stderr[-2000:]}")
    with open(os.path.join(workdir, "eval", "linear.json")) as f:
        record = json.load(f)
    return {"wall_s": round(wall, 1), "top1": record["top1"], "seconds": record["seconds"],
            "learning_rate": record["settings"]["learning_rate"],
            **({"sweep": [{k: t[k] for k in ("base_lr", "val_top1")} for t in record["sweep"]]}
               if "sweep" in record else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--lrs", default=LRS, help=f"comma-separated base learning rates ({LRS})")
    p.add_argument("--epochs", type=int, default=None, help="eval.linear_epochs (the run's)")
    p.add_argument("--only", default=None, help="one mode: separate, separate_cached, "
                                                "sweep_cold or sweep_warm")
    args = p.parse_args()
    lrs = args.lrs.split(",")
    common = [f"--config.eval.linear_epochs={args.epochs}"] if args.epochs else []
    caches = [os.path.join(args.workdir, "eval", n) for n in os.listdir(
        os.path.join(args.workdir, "eval")) if n.startswith("features-")] if os.path.isdir(
        os.path.join(args.workdir, "eval")) else []
    results = {}

    def mode(name, calls):
        if args.only and args.only != name:
            return
        start = time.perf_counter()
        runs = [_call(args.workdir, *common, *c) for c in calls]
        results[name] = round(time.perf_counter() - start, 1)
        print(json.dumps({"mode": name, "wall_s": results[name], "calls": runs}), flush=True)

    mode("separate", [[f"--config.eval.linear_lr={lr}", "--config.eval.feature_cache=false"]
                      for lr in lrs])
    for folder in caches:
        shutil.rmtree(folder, ignore_errors=True)
    mode("separate_cached", [[f"--config.eval.linear_lr={lr}"] for lr in lrs])
    for folder in caches + [os.path.join(args.workdir, "eval", n) for n in os.listdir(
            os.path.join(args.workdir, "eval")) if n.startswith("features-")]:
        shutil.rmtree(folder, ignore_errors=True)
    mode("sweep_cold", [[f"--config.eval.linear_lr={','.join(lrs)}"]])
    mode("sweep_warm", [[f"--config.eval.linear_lr={','.join(lrs)}"]])
    print(json.dumps({"summary": results, "learning_rates": lrs, "epochs": args.epochs,
                      "workdir": os.path.abspath(args.workdir)}), flush=True)


if __name__ == "__main__":
    main()
