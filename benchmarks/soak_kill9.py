"""Crash safety under kill -9: one demo run killed at random moments and resumed each time,
against the same run left alone.

Both runs are `python -m jaxssl train --config demo` with the tests' tiny model (ResNet-18 width
4, 16 px views of the built-in data, kNN bank 400 / queries 160) and more steps, on the CPU: a
checkpoint every 3 steps, the kNN monitor every 10. The reference runs once uninterrupted. The
soak run gets SIGKILL (sent to its whole process group) at --kills random moments, each followed
by the same command again, which resumes from the newest complete checkpoint; after the last
kill it runs to the end. Then every checkpoint both workdirs hold (the final one included) is
restored with the trainer's own Checkpointer and compared leaf by leaf, bit for bit (dtype,
shape and bytes), and so are the metrics.jsonl records without the timing field
train/images_per_sec.

    python benchmarks/soak_kill9.py                                 # 20 kills, 120 steps, seed 0
    python benchmarks/soak_kill9.py --kills 5 --steps 30 --seed 1   # a shorter soak
    python benchmarks/soak_kill9.py --compile-cache                 # restarts compile from a cache

The moments (random.Random(--seed)) follow the reference's timeline. Each kill falls before the
attempt's first logged step (start-up, restoring, the kNN evaluation at initialisation,
compiling the step) with the probability that the reference spent its time there, at a moment
uniform in the time attempts have taken to get there (their median). The other kills are given
moments uniform in the reference's time after its first logged step, in increasing order, so
that they spread over the whole of training (steps, checkpoint writes, kNN evaluations, the
final checkpoint's write and the exit) although each resume goes back to a checkpoint: such a kill
waits until the attempt logs the step the reference had logged last before that moment, then
as long as the reference took from there. (Drawing each kill uniform over what is left of the
run instead puts nearly all of them in the start-up, which every resume repeats.)

A kill after the final checkpoint is complete (during the exit) leaves a finished run; the
kills left then fall in reruns of it (the command restores it, says it is done and ends), at
moments uniform in the time such a rerun took. An attempt that ends by itself before its moment
with exit 0 is reported and not counted as a kill; any other exit is a resume that failed:
FAIL, with its stderr. Prints one line per kill (moment, the newest complete
checkpoint and any write under way, the last step the attempt logged), a summary, PASS or FAIL
with the first differing leaf or record, and one JSON line. Exit status 0 on PASS, 1 on FAIL.
About 8 minutes with the defaults on a shared 2-core CPU; the workdirs and logs are removed on PASS
unless --keep or --root.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

LOG_EVERY, EVAL_EVERY = 2, 10
# The tests' tiny settings (tests/test_train.py TINY) with the soak's cadence.
TINY = [
    ("batch_size", "16"), ("model.width", "4"), ("model.head_hidden_dims", "(16,)"),
    ("model.out_dim", "8"), ("data.out_size", "16"), ("eval.bank_examples", "400"),
    ("eval.query_examples", "160"), ("eval.batch_size", "160"), ("eval.knn_k", "20"),
    ("checkpoint_every_steps", "3"), ("log_every_steps", str(LOG_EVERY)),
    ("eval_every_steps", str(EVAL_EVERY)),
]
TIMING = "train/images_per_sec"
STEP_LINE = re.compile(r"step (\d+)/")


def overrides(steps):
    return [("num_steps", str(steps))] + TINY


def command(workdir, steps):
    return ([sys.executable, "-m", "jaxssl", "train", "--config", "demo", "--workdir", workdir]
            + [f"--config.{k}={v}" for k, v in overrides(steps)])


class Attempt:
    """One `jaxssl train` process: its stdout lines with their times (seconds after the start),
    its stderr in a file. Started in a session of its own, so a kill reaches all it started."""

    def __init__(self, argv, env, log_prefix):
        self.lines: list[tuple[float, str]] = []
        self.timed_out = False
        self.stderr_path = log_prefix + ".stderr"
        self._stdout = open(log_prefix + ".stdout", "w")
        self._stderr = open(self.stderr_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
            self._stdout.write(line)

    def elapsed(self):
        return time.monotonic() - self.t0

    def logged_steps(self):
        """[(time, step)] of the training log lines so far."""
        out = []
        for t, line in list(self.lines):
            m = STEP_LINE.match(line)
            if m:
                out.append((t, int(m.group(1))))
        return out

    def first_step_at(self):
        """When the first training step's log line came, or None."""
        logged = self.logged_steps()
        return logged[0][0] if logged else None

    def last_line(self):
        return self.lines[-1][1] if self.lines else "(nothing printed yet)"

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout=None):
        """The exit status; an attempt still running after `timeout` s is killed (timed_out)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
            rc = self.proc.wait()
        self._reader.join()
        self._stdout.close()
        self._stderr.close()
        return rc

    def stderr_tail(self, n=30):
        with open(self.stderr_path) as f:
            return "".join(f.readlines()[-n:])


def start_text(resumed_from):
    return "fresh start" if resumed_from is None else f"resumed from step {resumed_from}"


def checkpoint_dirs(workdir):
    """(newest complete checkpoint step or None, {name: identity} of the unfinished writes) in
    workdir: orbax writes a step into a temporary directory and renames it to the step's number
    when done. The identity (inode, mtime) tells a write started since from one left before."""
    path = os.path.join(workdir, "checkpoints")
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return None, {}
    done = [int(n) for n in names if n.isdigit()]
    writes = {}
    for n in sorted(names):
        if not n.isdigit():
            try:
                st = os.stat(os.path.join(path, n))
                writes[n] = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
    return (max(done) if done else None), writes


def restore_all(workdir, template):
    """{step: restored state} of every checkpoint in workdir, read back with the trainer's own
    Checkpointer."""
    from jaxssl import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return {step: ckpt.restore(template, step) for step in ckpt.all_steps()}
    finally:
        ckpt.close()


def first_leaf_difference(a, b):
    """None when the two states are bitwise equal, else the path of the first leaf that is not
    and how it differs."""
    import jax
    import numpy as np

    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
    if [p for p, _ in leaves_a] != [p for p, _ in leaves_b]:
        return "the two states have different leaves"
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        # Bytes, not values: -0.0 against 0.0 or two NaN payloads count as different too.
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            if x.dtype != y.dtype or x.shape != y.shape:
                detail = f"{x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}"
            elif not np.any(x != y):
                detail = "equal values, different bits (-0.0 against 0.0, or NaN payloads)"
            else:
                gap = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
                detail = f"{int(np.sum(x != y))} of {x.size} values differ, largest by {gap}"
            return f"{jax.tree_util.keystr(path)}: {detail}"
    return None


def records_without_timing(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop(TIMING, None)
    return records


def compare(ref_dir, soak_dir, steps):
    """The soak run's outputs against the reference's: (failures, notes, leaves per state,
    metrics records, checkpoint steps compared)."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported: this process only reads
    import jax

    from jaxssl import configuration, experiment, parallel

    # The state's layout (no values: jax.eval_shape) from the same config the command lines gave.
    config = configuration.load_config("demo")
    configuration.apply_overrides(config, overrides(steps))
    exp = experiment.build(config, parallel.make_mesh(), with_eval=False)
    template = jax.eval_shape(lambda: experiment.initial_state(exp))

    failures, notes = [], []
    ref, soak = restore_all(ref_dir, template), restore_all(soak_dir, template)
    if set(ref) != set(soak):
        notes.append(f"checkpoints kept: reference {sorted(ref)}, soak {sorted(soak)}")
    if steps not in soak:
        failures.append(f"the soak run has no checkpoint at the final step {steps} "
                        f"(it has {sorted(soak)})")
    common = sorted(set(ref) & set(soak))
    for step in common:
        diff = first_leaf_difference(ref[step], soak[step])
        if diff:
            failures.append(f"state at step {step} differs: {diff}")

    a, b = records_without_timing(ref_dir), records_without_timing(soak_dir)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        failures.append(f"metrics.jsonl differs ({len(a)} records against {len(b)}), first at "
                        f"record {i}: {a[i] if i < len(a) else None} against "
                        f"{b[i] if i < len(b) else None}")
    return failures, notes, len(jax.tree.leaves(template)), len(a), common


def plan_kills(rng, n, ref_first, ref_total):
    """n kill plans in order: None (in the start-up) or a moment of the reference's timeline
    after its first logged step; the latter ascending."""
    in_startup = [rng.random() < ref_first / ref_total for _ in range(n)]
    moments = iter(sorted(rng.uniform(ref_first, ref_total)
                          for _ in range(in_startup.count(False))))
    return [None if s else next(moments) for s in in_startup]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs sent to the soak run")
    p.add_argument("--steps", type=int, default=120, help="training steps of the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--root", help="where the two workdirs and the logs go (default: a new "
                   "temporary directory, removed on PASS unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the workdirs and logs")
    p.add_argument("--compile-cache", action="store_true",
                   help="give the runs a persistent XLA compilation cache (JAX_COMPILATION_"
                        "CACHE_DIR in the root): restarts skip most of compiling")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds an attempt that is not killed may take")
    args = p.parse_args()

    root = os.path.abspath(args.root) if args.root else tempfile.mkdtemp(prefix="soak_kill9_")
    os.makedirs(root, exist_ok=True)
    ref_dir, soak_dir = os.path.join(root, "reference"), os.path.join(root, "soak")
    logs = os.path.join(root, "logs")
    for d in (ref_dir, soak_dir):
        if os.path.exists(d):
            sys.exit(f"{d} exists: give an empty --root")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if args.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "xla_cache")
    t_start = time.monotonic()
    print(f"soak_kill9: {args.kills} kills of one {args.steps}-step demo run (tiny model, CPU), "
          f"seed {args.seed}, root {root}", flush=True)
    print("compilation cache: " + (env["JAX_COMPILATION_CACHE_DIR"] if args.compile_cache
                                   else "none (every restart compiles again)"), flush=True)

    # 1. The reference, uninterrupted.
    ref = Attempt(command(ref_dir, args.steps), env, os.path.join(logs, "reference"))
    rc = ref.finish(timeout=args.timeout)
    ref_total, ref_logged = ref.elapsed(), ref.logged_steps()
    if rc != 0 or not ref_logged:
        how = "did not end within --timeout" if ref.timed_out else f"ended with exit status {rc}"
        print(f"FAIL: the reference run {how}\n{ref.stderr_tail()}")
        return 1
    ref_first = ref_logged[0][0]
    print(f"reference: {ref_total:.1f} s, exit 0; first step logged at {ref_first:.1f} s, the "
          f"last ({ref_logged[-1][1]}) at {ref_logged[-1][0]:.1f} s", flush=True)

    # 2. The soak run: kill, resume, ... then run to the end.
    rng = random.Random(args.seed)
    plans = plan_kills(rng, args.kills, ref_first, ref_total)
    startups = [ref_first]  # time to the first logged step of every attempt that got there
    reruns = []  # how long attempts on the finished run took to end by themselves
    kills, self_ended, failure, n = [], [], None, 0
    while len(kills) < args.kills and n < 3 * args.kills:
        n += 1
        moment = plans[len(kills)]
        resumed_from, leftovers = checkpoint_dirs(soak_dir)
        if resumed_from == args.steps:
            # A kill after the final checkpoint (in the final evaluation or the exit) leaves a
            # finished run: the command then only restores it and ends. The kills left fall in
            # such reruns, as long as they took.
            anchor_step, wait = None, rng.uniform(0.0, statistics.median(reruns or startups))
            plan = "in a rerun of the finished run"
        elif moment is None:
            anchor_step, wait = None, rng.uniform(0.0, statistics.median(startups))
            plan = "in the start-up"
        else:
            # The reference's last log line before the moment, and how long after it it came.
            j = bisect.bisect_right([t for t, _ in ref_logged], moment) - 1
            anchor_step, wait = ref_logged[j][1], moment - ref_logged[j][0]
            plan = f"{wait:.2f} s after step {anchor_step} is logged (reference at {moment:.1f} s)"
        attempt = Attempt(command(soak_dir, args.steps), env, os.path.join(logs, f"attempt{n:02d}"))
        due = wait if anchor_step is None else None
        while attempt.proc.poll() is None:
            if due is None:
                seen = [t for t, s in attempt.logged_steps() if s >= anchor_step]
                if seen:
                    due = seen[0] + wait
            if due is not None and attempt.elapsed() >= due:
                break
            time.sleep(0.005)
        killed = attempt.proc.poll() is None
        if killed:
            newest, writing = checkpoint_dirs(soak_dir)  # just before the kill
            # A temporary directory already there at the start is a write an earlier kill cut
            # short, not one of this attempt.
            writing = [w for w, ident in writing.items() if leftovers.get(w) != ident]
            attempt.kill()
            at = attempt.elapsed()
        rc = attempt.finish(timeout=args.timeout)
        logged = attempt.logged_steps()
        if logged:
            startups.append(logged[0][0])
        if rc == 0:
            # It ended by itself before its moment: the run is finished (the next attempts are
            # reruns of it). Not a kill.
            self_ended.append(n)
            if resumed_from == args.steps:
                reruns.append(attempt.elapsed())
            print(f"attempt {n:2d}: {start_text(resumed_from)}, planned {plan}; ended by itself "
                  f"(exit 0) after {attempt.elapsed():.1f} s: {attempt.last_line()}", flush=True)
            continue
        if rc != -signal.SIGKILL or not killed:
            how = ("did not end within --timeout" if attempt.timed_out
                   else f"failed with exit status {rc}")
            failure = (f"attempt {n} ({start_text(resumed_from)}) {how} "
                       f"after {attempt.elapsed():.1f} s; its stderr ends:\n"
                       f"{attempt.stderr_tail()}")
            break
        last_step = logged[-1][1] if logged else None
        # The kNN monitor runs after steps that are multiples of EVAL_EVERY and after the last,
        # before that step's log line (the checkpoint of a step is started after its line): a
        # kill after the line of step s and before the next is in such an interval when the
        # next logged step is one of those. After the last line come the final checkpoint's
        # write, the plots and the exit.
        next_step = None if last_step is None else min(last_step + LOG_EVERY, args.steps)
        knn_interval = last_step is not None and last_step < args.steps and (
            next_step % EVAL_EVERY == 0 or next_step == args.steps)
        kills.append({"n": n, "resumed_from": resumed_from, "at_s": round(at, 2),
                      "newest_checkpoint": newest, "writing": writing,
                      "leftovers": sorted(leftovers), "last_step_logged": last_step,
                      "knn_interval": knn_interval, "last_line": attempt.last_line()})
        where = (f"after the line of step {last_step}" if last_step is not None
                 else "before any step was logged")
        if knn_interval:
            where += " (a kNN evaluation comes before the next line)"
        elif last_step == args.steps:
            where += " (the last: final checkpoint write and exit)"
        write = f"; write under way: {', '.join(writing)}" if writing else ""
        if leftovers:
            write += f" (left by an earlier kill: {', '.join(sorted(leftovers))})"
        print(f"kill {len(kills):2d}: {start_text(resumed_from)}, planned {plan}; SIGKILL at "
              f"{at:5.1f} s, {where}; newest checkpoint then: step {newest}{write}", flush=True)

    if failure is None:
        resumed_from, _ = checkpoint_dirs(soak_dir)
        last = Attempt(command(soak_dir, args.steps), env, os.path.join(logs, "final"))
        rc = last.finish(timeout=args.timeout)
        print(f"final attempt: {start_text(resumed_from)}, exit {rc} after "
              f"{last.elapsed():.1f} s: {last.last_line()}", flush=True)
        if rc != 0:
            how = ("did not end within --timeout" if last.timed_out
                   else f"failed with exit status {rc}")
            failure = (f"the final attempt ({start_text(resumed_from)}) {how}; its stderr "
                       f"ends:\n{last.stderr_tail()}")

    # 3. Compare with the reference.
    failures, notes, n_leaves, n_records, steps_compared = [], [], 0, 0, []
    if failure:
        failures.append(failure)
    else:
        failures, notes, n_leaves, n_records, steps_compared = compare(ref_dir, soak_dir,
                                                                       args.steps)
    wall = time.monotonic() - t_start

    # 4. Summary.
    after_end = sum(k["resumed_from"] == args.steps for k in kills)
    in_startup = sum(k["last_step_logged"] is None for k in kills) - after_end
    in_knn = sum(k["knn_interval"] for k in kills)
    during_write = sum(bool(k["writing"]) for k in kills)
    beside = sum(bool(k["leftovers"]) for k in kills)
    print()
    print("kill moments (s after the attempt's start): "
          + ", ".join("%.1f" % k["at_s"] for k in kills))
    print("newest complete checkpoint at each kill: "
          + ", ".join(str(k["newest_checkpoint"]) for k in kills))
    print(f"kills: {len(kills)}, each followed by a resume; {in_startup} before the attempt "
          f"logged a step (start-up, restoring, kNN at initialisation, compiling), "
          f"{len(kills) - in_startup - after_end} in training ({in_knn} of them in an interval "
          f"with a kNN evaluation), {after_end} in reruns of the finished run; {during_write} "
          "with a checkpoint write of the attempt under way")
    if beside:
        print(f"{beside} killed attempts had started beside the temporary directory of a write "
              "an earlier kill cut short")
    if self_ended:
        print("attempts that ended by themselves (exit 0) before their kill: "
              + ", ".join(map(str, self_ended)))
    if len(kills) < args.kills:
        print(f"note: {len(kills)} of {args.kills} kills made in {n} attempts")
    for note in notes:
        print(f"note: {note}")
    if not failures:
        print(f"compared: {n_leaves} leaves of the state at steps {steps_compared}, bit for bit, "
              f"and {n_records} metrics.jsonl records without {TIMING}")
    print(f"total wall time: {wall:.0f} s ({wall / 60:.1f} min)")
    print("PASS: bitwise equal to the uninterrupted run" if not failures else
          "FAIL: " + "\nFAIL: ".join(failures))
    print(json.dumps({"benchmark": "soak_kill9", "pass": not failures, "kills": len(kills),
                      "resumes": len(kills), "steps": args.steps, "seed": args.seed,
                      "compile_cache": args.compile_cache,
                      "kill_moments_s": [k["at_s"] for k in kills],
                      "newest_checkpoint_at_kill": [k["newest_checkpoint"] for k in kills],
                      "kills_before_first_step": in_startup, "kills_in_knn_interval": in_knn,
                      "kills_during_checkpoint_write": during_write,
                      "kills_in_finished_reruns": after_end, "attempts": n + (failure is None),
                      "reference_s": round(ref_total, 1), "wall_s": round(wall, 1),
                      "failures": failures}))
    if failures or args.keep or args.root:
        print(f"workdirs and logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
