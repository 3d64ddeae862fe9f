"""Multi-process training on one machine: 2 processes x 4 fake CPU devices with jax.distributed
(collectives over gloo) against 1 process x 8 devices; SIGTERM to one process; bad flags.

The processes are `python -m jaxssl train` subprocesses, as `launch/local_multiprocess.sh`
starts them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxssl import checkpoint, evaluation, train
from test_train import TINY, records_without_timing, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(workdir, pid, port, *extra, num_processes=2, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    cmd = [sys.executable, "-m", "jaxssl", "train", "--config", "demo", "--workdir", str(workdir),
           "--coordinator", f"localhost:{port}", "--num_processes", str(num_processes),
           "--process_id", str(pid), "--distributed_timeout", str(timeout)]
    cmd += [f"--config.{k}={v}" for k, v in TINY + list(extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_launch_scripts_parse_and_print_their_usage():
    launch = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch")
    scripts = sorted(f for f in os.listdir(launch) if f.endswith((".sh", ".sbatch")))
    assert scripts == ["local_gpu.sh", "local_multiprocess.sh", "slurm.sbatch", "tpu_vm.sh"]
    for name in scripts:
        path = os.path.join(launch, name)
        subprocess.run(["bash", "-n", path], check=True)
        out = subprocess.run(["bash", path, "--help"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith("usage:"), (name, out.stdout)
    # The TPU script's gcloud commands, without gcloud.
    out = subprocess.run(["bash", os.path.join(launch, "tpu_vm.sh"), "create", "--spot",
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("gcloud compute tpus tpu-vm create jaxssl") and "--spot" in out


def _finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def _saved_params(workdir, template):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step()
        return step, ckpt.restore_subtrees(
            {"params": template.params, "batch_stats": template.batch_stats}, step)
    finally:
        ckpt.close()


def test_two_processes_of_4_devices_equal_one_process_of_8(tmp_path):
    single = train.train(tiny_config(), str(tmp_path / "single"))  # 8 devices, this process
    # The two processes as launch/local_multiprocess.sh starts them.
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch",
                          "local_multiprocess.sh")
    run = subprocess.run(
        ["bash", script, "-n", "2", "-d", "4", "-p", str(_free_port()), "-l", str(tmp_path), "--",
         "--config", "demo", "--workdir", str(tmp_path / "multi"), "--distributed_timeout", "120",
         *[f"--config.{k}={v}" for k, v in TINY]],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    assert "done: 12 steps" in run.stdout
    with open(tmp_path / "jaxssl_process_1.log") as f:
        assert "process 1 of 2 (flags): 4 of 8 devices here" in f.read()
    # Only process 0 writes logs; its metrics (losses, kNN over both processes' features) equal
    # the single process's.
    got, want = records_without_timing(tmp_path / "multi"), records_without_timing(
        tmp_path / "single")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in b:
            # Equal up to float32 summation order (gloo's collectives against in-process ones).
            np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=f"{key} @ {b['step']}")
    template = jax.device_get(single.state)
    step, multi = _saved_params(tmp_path / "multi", template)
    assert step == 12
    for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves((template.batch_stats,
                                                           template.params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)

    # Evaluation across the same two processes equals this process's on 8 devices: the linear
    # probe (labels and classifier placed by every process) and fine-tuning (a state built from
    # the restored arrays, logits gathered from both processes).
    for kind, extra in (("linear", ["--config.eval.linear_epochs=3"]),
                        ("finetune", ["--config.eval.finetune_epochs=1",
                                      "--config.eval.finetune_fraction=0.04"])):
        run = subprocess.run(
            ["bash", script, "-n", "2", "-d", "4", "-p", str(_free_port()), "-l", str(tmp_path),
             "--", "eval", kind, "--workdir", str(tmp_path / "multi"), *extra],
            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
            timeout=600)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
        with open(tmp_path / "multi" / "eval" / f"{kind}.json") as f:
            got = json.load(f)
        config = tiny_config(*(arg[len("--config."):].split("=") for arg in extra))
        want = evaluation.evaluate(kind, config, str(tmp_path / "multi"))
        assert got["step"] == want["step"] == 12
        for key in ("top1", "top5"):
            assert got[key] == pytest.approx(want[key], abs=2e-3), (kind, key)  # 2 of 1000
        np.testing.assert_allclose([h["loss"] if "loss" in h else h["train/loss"]
                                    for h in got["train_history"]],
                                   [h["loss"] if "loss" in h else h["train/loss"]
                                    for h in want["train_history"]], rtol=1e-4)


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    extra = [("num_steps", "40"), ("checkpoint_every_steps", "4"), ("eval.knn", "false")]
    port = _free_port()
    procs = [_spawn(workdir, pid, port, *extra) for pid in (0, 1)]
    ckpt_dir = workdir / "checkpoints"
    deadline = time.time() + 300
    while not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes, outs = _finish(procs)
    assert codes == [0, 0], outs
    # Process 0 got no signal: it stopped because process 1 did, at the same step.
    said = [line for line in outs[0][0].splitlines() if "saved a checkpoint at step" in line]
    assert said and "a stop request on another process" in said[0], outs[0]
    step = int(said[0].split("at step ")[1].split()[0])
    assert step < 40
    with open(workdir / "metrics.jsonl") as f:
        assert max(json.loads(line)["step"] for line in f) <= step
    # The same command again resumes both processes from that step and finishes.
    port = _free_port()
    procs = [_spawn(workdir, pid, port, *extra) for pid in (0, 1)]
    codes, outs = _finish(procs)
    assert codes == [0, 0], outs
    assert f"resuming from the checkpoint at step {step} of 40" in outs[0][0]
    assert "done: 40 steps" in outs[0][0]


def _one_line_error(proc, match, within):
    start = time.time()
    out, err = proc.communicate(timeout=within + 60)
    assert proc.returncode == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("jaxssl:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    return time.time() - start


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
    # Process 1 of 2, and nobody runs process 0: it gives up after --distributed_timeout.
    proc = _spawn(tmp_path / "w", 1, _free_port(), timeout=5)
    assert _one_line_error(proc, "did not answer within 5 s", 5) < 90


def test_mismatched_process_counts_are_a_clear_error_in_bounded_time(tmp_path):
    port = _free_port()
    procs = [_spawn(tmp_path / "w", 0, port, num_processes=2, timeout=8),
             _spawn(tmp_path / "w", 1, port, num_processes=3, timeout=8)]
    for p in procs:
        assert _one_line_error(p, "the processes disagree", 8) < 120


@pytest.mark.parametrize("argv,match", [
    (["--coordinator", "localhost:1"], "go together"),
    (["--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id must lie in [0, 2)"),
    (["--coordinator", "localhost", "--num_processes", "2", "--process_id", "0"], "HOST:PORT"),
])
def test_bad_flags(argv, match, tmp_path, capsys):
    from jaxssl import cli

    assert cli.main(["train", "--workdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
