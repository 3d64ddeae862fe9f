"""The whole training loop against the pure step: how much of the step's throughput
`jaxssl train` keeps (target: at least 90%).

The loop is `jaxssl.train.train` (what `jaxssl train` runs), in this process, on CIFAR-10 from
the JPEG npz held in memory with the augmentation on the device (no TensorFlow), with the model,
batch, loss and optimizer of `benchmarks/step_throughput.py --model resnet18_cifar
--device-augment`: ResNet-18 with the CIFAR stem, a 2048-128 head, batch 512 of 32 px uint8
images, temperature 0.2, SGD with momentum 0.9, bfloat16 compute, global BatchNorm. The online
probe is off (the pure step has none; --online-probe times it too). The pure step runs first,
in its own process (step_throughput.py), so neither holds the other's accelerator memory.

    python benchmarks/train_loop_throughput.py                    # on the GPU
    python benchmarks/train_loop_throughput.py --step-json FILE   # reuse a step_throughput line
    python benchmarks/train_loop_throughput.py --tiny             # CPU smoke test

Steady state, compilation and the first evaluation excluded, measured two ways:
- trainer_images_per_s: the trainer's own `train/images_per_sec` of every logged window but the
  first, combined as total images / total time. Each window starts after the previous log
  step's bookkeeping and ends when its last step's metrics are on the host.
- wall_images_per_s: images between the second and the last progress line the trainer prints
  (one per log step), over the wall-clock time between them: everything the loop does counts,
  logging and checks included.
`ratio` is wall_images_per_s / step images_per_s. The kNN monitor is off unless --knn (its
evaluations fall outside both timings anyway; they only make the run longer).

Prints one JSON line per result: the pure step's (as step_throughput.py prints it) and the loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
# Where the CIFAR-10 JPEG npz is looked for: a copy inside the checkout (git-ignored .data/,
# what the GPU machine gets), then the shared folder next to the repository.
NPZ_PLACES = (os.path.join(ROOT, ".data", "cifar10_jpeg.npz"),
              os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10_jpeg.npz"))
TARGET = 0.90
_STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


class _TimedStream:
    """A non-terminal stream for the trainer's messages: echoes them to stderr and notes when
    each progress line ("step N/T | ...") arrives."""

    def __init__(self):
        self.lines: list[tuple[float, int, str]] = []  # (time, step, line)
        self._buffer = ""

    def write(self, text: str) -> int:
        now = time.perf_counter()
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            match = _STEP_LINE.match(line)
            if match:
                self.lines.append((now, int(match.group(1)), line))
            print(line, file=sys.stderr, flush=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def find_npz(path: str | None) -> str | None:
    if path:
        return path
    return next((p for p in NPZ_PLACES if os.path.isfile(p)), None)


def pure_step(args) -> dict:
    """The step_throughput.py line of the same model and batch, read from --step-json or
    measured now in a subprocess."""
    if args.step_json:
        with open(args.step_json) as f:
            rows = [json.loads(line) for line in f if line.strip().startswith("{")]
        rows = [r for r in rows if r.get("framework") == "jax" and r.get("model") == "resnet18_cifar"
                and r.get("device_augment") and r.get("batch") == args.batch]
        if not rows:
            raise SystemExit(f"{args.step_json} has no jax resnet18_cifar --device-augment line "
                             f"with batch {args.batch}")
        return rows[-1]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "step_throughput.py"), "--framework",
           "jax", "--model", "resnet18_cifar", "--device-augment", "--batch", str(args.batch),
           "--width", str(args.width)]
    if args.tiny:  # not step_throughput's --tiny (2 steps): enough steps to time on a CPU
        cmd += ["--steps", "20", "--warmup", "3"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def loop_config(args, npz: str | None):
    from jaxssl import configuration

    c = configuration.default_config()
    c.seed = 0
    c.batch_size = args.batch
    c.num_steps = args.steps
    c.log_every_steps = args.log_every
    c.eval_every_steps = 10 * args.steps  # the kNN monitor (with --knn) at the start and end only
    c.checkpoint_every_steps = args.steps  # one save, at the end, after the last timed window
    c.checkpoint.keep = 1
    if npz:
        c.data.source, c.data.path = "cifar10_npz", npz
    else:
        c.data.source = "builtin"
    c.data.recipe = "simclr_cifar"
    c.data.augment = "device"
    c.data.out_size = 32
    c.model.encoder = "resnet18"
    c.model.cifar_stem = True
    c.model.width = args.width
    c.model.head_hidden_dims = (2048,)
    c.model.out_dim = 128
    c.model.output_bn = False
    c.model.zero_init_last_bn = False
    c.model.dtype = "bfloat16"
    c.model.bn = "global"
    c.optim.name = "sgd"  # step_throughput.py's: SGD, momentum 0.9, weight decay 1e-6
    c.optim.base_lr = 0.1
    c.optim.lr_scaling = "none"
    c.optim.warmup_epochs = 0.0
    c.optim.weight_decay = 1e-6
    c.optim.momentum = 0.9
    c.loss.temperature = 0.2
    c.eval.knn = args.knn
    c.eval.online_probe = args.online_probe
    if args.tiny:
        c.eval.bank_examples, c.eval.query_examples, c.eval.knn_k = 400, 160, 20
    return c


def steady_rates(records: list[dict], lines: list[tuple[float, int, str]], batch: int):
    """(trainer images/s, wall-clock images/s, steps timed) over every log window but the first."""
    timed = [r for r in records if "train/images_per_sec" in r and r["step"] > 0]
    steps, seconds = 0, 0.0
    for prev, rec in zip(timed, timed[1:]):  # the first window holds the warm-up: left out
        n = rec["step"] - prev["step"]
        steps += n
        seconds += n * batch / rec["train/images_per_sec"]
    trainer = steps * batch / seconds if seconds else None
    # Progress lines after the first; the last one is printed after the final kNN evaluation
    # when the monitor is on, so it is left out then.
    marks = [(t, n) for t, n, line in lines[1:] if "kNN" not in line]
    wall = None
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        wall = (marks[-1][1] - marks[0][1]) * batch / (marks[-1][0] - marks[0][0])
    return trainer, wall, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps of the loop")
    p.add_argument("--log-every", type=int, default=100, help="steps per timed window")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--data", default=None, help="the CIFAR-10 JPEG npz (default: .data/ in the "
                   "checkout, then ../shared/data/cifar10/; the built-in data if neither)")
    p.add_argument("--step-json", default=None,
                   help="a file of step_throughput.py lines to take the pure step from")
    p.add_argument("--knn", action="store_true", help="keep the kNN monitor on")
    p.add_argument("--online-probe", action="store_true", help="train the online probe too")
    p.add_argument("--workdir", default=None, help="the run's workdir (default: a temporary one)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: width 8, batch 8, 40 steps")
    args = p.parse_args()
    if args.tiny:
        args.width, args.batch, args.steps, args.log_every = 8, 8, 40, 10
    npz = find_npz(args.data)
    step = pure_step(args)  # first: before this process touches the accelerator

    from jaxssl import train  # imports jax

    import jax

    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxssl_loop_")
    stream = _TimedStream()
    t0 = time.perf_counter()
    try:
        result = train.train(loop_config(args, npz), workdir, stream=stream)
        run_s = time.perf_counter() - t0
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    trainer, wall, timed_steps = steady_rates(records, stream.lines, args.batch)
    first = stream.lines[0][0] - t0 if stream.lines else None
    step_rate = step["images_per_s"]
    row = {
        "benchmark": "train_loop", "model": "resnet18_cifar", "device": jax.devices()[0].device_kind,
        "version": jax.__version__, "source": "cifar10_npz" if npz else "builtin",
        "batch": args.batch, "width": args.width, "steps": args.steps, "timed_steps": timed_steps,
        "online_probe": args.online_probe, "knn": args.knn, "status": result.status,
        "trainer_images_per_s": round(trainer, 1) if trainer else None,
        "wall_images_per_s": round(wall, 1) if wall else None,
        "step_images_per_s": step_rate,
        "ratio": round(wall / step_rate, 3) if wall else None,
        "ratio_trainer": round(trainer / step_rate, 3) if trainer else None,
        "target": TARGET, "meets_target": bool(wall and wall / step_rate >= TARGET),
        "start_to_first_log_s": round(first, 1) if first is not None else None,
        "run_s": round(run_s, 1),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
