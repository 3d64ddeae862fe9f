"""Faults a long run must survive or refuse cleanly (issue 14): a resume with another config, a
checkpoint of another model, a damaged latest checkpoint, a foreign folder as workdir. Each case
runs the trainer on the tiny demo model against a copy of one trained workdir (2 steps, a
checkpoint after each)."""

import json

import io
import os
import shutil

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.checkpoint import Checkpointer
from jaxssl.configuration import ConfigError
from jaxssl.lock import LOCK_NAME, WorkdirLock
from test_train import TINY, tiny_config

STEPS = [("num_steps", "2"), ("checkpoint_every_steps", "1"), ("eval.knn", "false"),
         ("log_every_steps", "1")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train(tiny_config(*STEPS), str(workdir), stream=io.StringIO())
    return workdir


def _copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir



def _files(workdir):
    """{path: mtime} of the run's files (the lock, rewritten by every run that holds it, aside)."""
    return {os.path.relpath(os.path.join(r, n), workdir): os.path.getmtime(os.path.join(r, n))
            for r, _, ns in os.walk(workdir) for n in ns if n != LOCK_NAME}

@pytest.mark.parametrize("field,value", [("model.encoder", "resnet34"), ("model.out_dim", "16"),
                                         ("method", "moco")])
def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path, field, value):
    """Before: every mismatch was taken for an online-probe change and a partial restore
    trained a ResNet-18 from part of a ResNet-34's weights, exit 0."""
    workdir = _copy(trained, tmp_path)
    before = _files(workdir)
    with pytest.raises(ConfigError, match="step 2 .* is of a different model") as e:
        train.train(tiny_config(*STEPS, (field, value)), str(workdir), stream=io.StringIO(),
                    allow_config_change=True)  # past the config check: the checkpoint's own
    assert "\n" not in str(e.value)
    assert _files(workdir) == before  # nothing written, nothing removed


def _damage_data(step_dir):
    """Truncate every data file of the checkpoint to half its size."""
    data = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        path = os.path.join(data, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _damage_metadata(step_dir):
    with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {')


@pytest.mark.parametrize("damage", [_damage_data, _damage_metadata], ids=["data", "metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(trained, tmp_path, damage):
    """Before: a truncated data file gave a 335-line traceback and the intact step 1 was never
    tried; damaged metadata was called "a different model; use a new workdir"."""
    workdir = _copy(trained, tmp_path)
    damage(str(workdir / "checkpoints" / "2"))
    out = io.StringIO()
    result = train.train(tiny_config(*STEPS), str(workdir), stream=out)
    text = out.getvalue()
    assert "checkpoint at step 2" in text and "is damaged" in text, text
    assert "different model" not in text
    assert "resuming from the checkpoint at step 1 of 2" in text, text
    assert result.status == "done" and result.step == 2
    aside = os.listdir(workdir / "damaged_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("2.")
    # Step 2 trained again from step 1 is the step 2 that was damaged, bit for bit.
    pristine = Checkpointer(str(trained / "checkpoints"))
    want = pristine.restore(jax.device_get(result.state), 2)
    pristine.close()
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_checkpoint_damaged_is_one_line(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in ("1", "2"):
        _damage_data(str(workdir / "checkpoints" / step))
    with pytest.raises(ConfigError, match="no checkpoint .* could be restored") as e:
        train.train(tiny_config(*STEPS), str(workdir), stream=io.StringIO())
    assert "\n" not in str(e.value)
    assert sorted(n.split(".")[0] for n in os.listdir(workdir / "damaged_checkpoints")) == ["1", "2"]




@pytest.mark.parametrize("changes", [
    [("seed", "1")], [("batch_size", "8")], [("optim.base_lr", "0.75")],
    [("data.recipe", "simclr")], [("data.source", "cifar10_npz"), ("data.path", "x.npz")],
    [("num_steps", "4")]], ids=lambda c: c[0][0])
def test_a_resume_that_changes_what_is_trained_is_refused(trained, tmp_path, changes):
    """Before: a note, exit 0, the learning rate jumped and config.json was overwritten."""
    workdir = _copy(trained, tmp_path)
    before = _files(workdir)
    with pytest.raises(ConfigError, match="differs from the one that started") as e:
        train.train(tiny_config(*STEPS, *changes), str(workdir), stream=io.StringIO())
    assert "\n" not in str(e.value) and changes[0][0] in str(e.value)
    assert "--allow_config_change" in str(e.value)
    assert _files(workdir) == before


def test_another_device_count_with_per_device_batchnorm_is_refused(trained, tmp_path):
    """Before: the device count was not recorded; with bn=local (one BatchNorm group per
    device) a resume on fewer devices silently changed BatchNorm. The workdir is made to read
    as a bn=local run started on 4 devices; this process has 8."""
    workdir = _copy(trained, tmp_path)
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["bn"] = "local"
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "run.json").write_text(json.dumps({"devices": 4, "processes": 1}))
    before = _files(workdir)
    with pytest.raises(ConfigError, match=r"in what is trained \(devices 4 -> 8\)"):
        train.train(tiny_config(*STEPS, ("model.bn", "local")), str(workdir),
                    stream=io.StringIO())
    assert _files(workdir) == before
    # With global BatchNorm the device count does not change the result: no refusal.
    config["model"]["bn"] = "global"
    (workdir / "config.json").write_text(json.dumps(config))
    assert train.train(tiny_config(*STEPS, ("model.bn", "global")), str(workdir),
                       stream=io.StringIO()).status == "done"


def test_an_allowed_change_is_recorded_and_config_json_kept(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    first = (workdir / "config.json").read_text()
    out = io.StringIO()
    result = train.train(tiny_config(*STEPS, ("num_steps", "3"), ("log_every_steps", "3")),
                         str(workdir), stream=out, allow_config_change=True)
    assert result.status == "done" and result.step == 3
    assert (workdir / "config.json").read_text() == first
    recorded = json.loads((workdir / "config-2.json").read_text())
    assert recorded["num_steps"] == 3 and json.loads(first)["num_steps"] == 2
    assert "num_steps" in out.getvalue() and "config-2.json" in out.getvalue()


def test_watching_fields_may_change_and_are_recorded(trained, tmp_path):
    """Logging, evaluation and checkpoint intervals do not change what is trained."""
    workdir = _copy(trained, tmp_path)
    stop = [s for s in STEPS if s[0] != "log_every_steps"] + [("log_every_steps", "2"),
                                                              ("eval.knn_k", "10")]
    result = train.train(tiny_config(*stop), str(workdir), stream=io.StringIO())
    assert result.status == "done"
    recorded = json.loads((workdir / "config-2.json").read_text())
    assert recorded["log_every_steps"] == 2 and recorded["eval"]["knn_k"] == 10


def test_a_foreign_folder_is_not_taken_as_a_workdir(tmp_path):
    """Before: jaxssl overwrote the folder's config.json-less contents' metrics and config."""
    workdir = tmp_path / "other_tool"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("theirs\n")
    with pytest.raises(ConfigError, match="not empty .* holds no jaxssl run") as e:
        train.train(tiny_config(*STEPS), str(workdir), stream=io.StringIO())
    assert "\n" not in str(e.value)
    assert os.listdir(workdir) == ["metrics.jsonl"]
    assert (workdir / "metrics.jsonl").read_text() == "theirs\n"


def test_another_processs_write_test_is_not_a_foreign_file(tmp_path):
    """Before: process 1 listed the new workdir while process 0 was testing that it can write
    there, took its probe for another tool's file, refused the workdir, and process 0 waited in
    its first collective until JAX aborted it (seen in CI)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / ".write_test.4242.0").write_text("ok")  # the probe, and write_bytes' temporary
    (workdir / "..write_test.4242.0.1a2b3c4d.tmp").write_text("o")
    assert train._prepare_workdir(str(workdir)) == str(workdir)
    (workdir / "theirs.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no jaxssl run"):
        train._prepare_workdir(str(workdir))


def test_a_second_run_in_a_live_workdir_is_refused_and_touches_nothing(trained, tmp_path):
    """Before: two runs started 3 s apart wrote metrics.jsonl steps 1-4 twice, and one died in
    orbax's clean-up of the other's checkpoint. The first run is stood in for by its lock, held
    here; the second is the CLI, as a user would start it."""
    import subprocess
    import sys

    workdir = _copy(trained, tmp_path)
    before = _files(workdir)
    metrics = (workdir / "metrics.jsonl").read_text()
    first = WorkdirLock(str(workdir))
    first.acquire()
    try:
        with pytest.raises(ConfigError, match=f"in use by another jaxssl run \\(pid {os.getpid()}"):
            train.train(tiny_config(*STEPS, ("num_steps", "4")), str(workdir),
                        stream=io.StringIO())
        out = subprocess.run(
            [sys.executable, "-m", "jaxssl", "train", "--config", "demo", "--workdir",
             str(workdir), *[f"--config.{k}={v}" for k, v in STEPS]],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    finally:
        first.release()
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"jaxssl: error: workdir {workdir} is in use by another jaxssl run "
                           f"(pid {os.getpid()} on host ") and "--workdir" in line, line
    assert _files(workdir) == before and (workdir / "metrics.jsonl").read_text() == metrics
    # Released: the next run goes on (a longer run, from the checkpoint at step 2).
    result = train.train(tiny_config(*STEPS, ("num_steps", "3")), str(workdir),
                         stream=io.StringIO(), allow_config_change=True)
    assert result.status == "done" and result.step == 3


@pytest.mark.parametrize("num_steps", [6, 2], ids=["mid-run save", "final save"])
def test_a_checkpoint_write_that_fails_in_the_background_ends_the_run_in_one_line(tmp_path,
                                                                                   num_steps):
    """Before: an async save that failed (a full disk, simulated by a file-size limit) surfaced
    only at the next save, as a 747-line traceback, and a failed final save printed 3,693 lines.
    Now the run ends at the step it is noticed, at the next save at the latest, with one line
    naming the step that failed. The limit (56 KB) lets config.json and the preview (50 KB)
    through and stops every checkpoint: its _METADATA alone is 88 KB for this model, its data
    files 50-170 KB (orbax splits them by the timing of the writes)."""
    import resource
    import subprocess
    import sys

    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (56_000, 56_000))  # noqa: E731
    workdir = tmp_path / "run"
    args = [("num_steps", str(num_steps)), ("checkpoint_every_steps", "2"), ("eval.knn", "false"),
            ("log_every_steps", "1")]
    out = subprocess.run(
        [sys.executable, "-m", "jaxssl", "train", "--config", "demo", "--workdir", str(workdir),
         *[f"--config.{k}={v}" for k, v in TINY + args]],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
        # Without the tests' compilation cache: its entries are over the limit too, and JAX
        # warns when it cannot write one (a fresh machine has none yet).
        env={k: v for k, v in dict(os.environ, JAX_PLATFORMS="cpu",
                                   JAX_ENABLE_COMPILATION_CACHE="false").items()
             if k not in ("JAXSSL_DEBUG", "JAX_COMPILATION_CACHE_DIR")})
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"jaxssl: saving the checkpoint at step 2 in {workdir}/checkpoints failed: File too "
        "large (errno 27); no complete checkpoint was written; free space (or lift the limit) "
        "and run the same command again"], out.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps[-1] <= min(4, num_steps) and "done:" not in out.stdout  # not on to the end
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]


@pytest.mark.parametrize("failing,kept", [
    (2, "the newest complete checkpoint, step 1, is intact and a rerun resumes from it"),
    (1, "no complete checkpoint was written")])
def test_a_failed_save_names_its_step_and_the_checkpoint_kept(tmp_path, monkeypatch, failing,
                                                              kept):
    # The last save of the run (step 2) and the first (step 1): orbax raises at once here.
    import orbax.checkpoint as ocp

    from jaxssl.checkpoint import CheckpointWriteError

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == failing:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as e:
        train.train(tiny_config(*STEPS), str(workdir), stream=io.StringIO())
    assert str(e.value) == (
        f"saving the checkpoint at step {failing} in {workdir}/checkpoints failed: No space left "
        f"on device (errno 28); {kept}; free space (or lift the limit) and run the same command "
        "again")
    lock = WorkdirLock(str(workdir))  # released on the way out
    assert lock.acquire() is None
    lock.release()


def test_orbaxs_background_noise_is_left_out_and_the_rest_kept(monkeypatch):
    from jaxssl import cli

    sink = io.StringIO()
    monkeypatch.delenv("JAXSSL_DEBUG", raising=False)
    monkeypatch.setattr("sys.stderr", sink)
    noise = ('Traceback (most recent call last):\n  File "base_events.py", line 806, in '
             'call_soon_threadsafe\n    self._check_closed()\nRuntimeError: Event loop is '
             'closed\n')
    other = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: '
             'kept\n')
    with cli._BackgroundNoise():
        import sys

        for piece in [noise[:40], noise[40:], "a warning\n", other, "partial", noise, "Trace"]:
            sys.stderr.write(piece)
    assert sink.getvalue() == "a warning\n" + other + "partial" + "Trace"


_SLOW_COMPILE = """
import ctypes, sys
from jaxssl import cli, experiment

real = experiment.compiled_step

def slow(exp):
    step = real(exp)

    def first_call(*args, **kwargs):
        print("compiling", flush=True)
        ctypes.CDLL(None).sleep(60)  # XLA compiling: C++ that no Python signal handler enters
        return step(*args, **kwargs)
    return first_call

experiment.compiled_step = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_compilation_ends_the_run_at_once(tmp_path):
    """Before: a SIGTERM before the first step waited for the compilation to end (minutes for
    a ResNet-50; a preempted TPU VM has ~30 s), then trained and saved a step. Now it ends the
    process at once: nothing had been trained. The compilation is stood in for by a 60 s sleep
    in C, where a Python signal handler cannot run."""
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_COMPILE, "train", "--config", "demo", "--workdir",
         str(workdir), *[f"--config.{k}={v}" for k, v in TINY + STEPS]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    seen = []
    while not seen or seen[-1] != "compiling\n":
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    took = time.time() - sent
    assert proc.returncode == 0 and took < 20, (took, "".join(seen) + out)
    assert out.strip().splitlines()[-1] == (
        "received SIGTERM before the first step of this run: nothing new to save; run the same "
        "command again to continue"), out
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    lock = WorkdirLock(str(workdir))  # released
    assert lock.acquire() is None
    lock.release()


def test_a_nan_in_the_online_probe_stops_before_it_is_saved(trained, tmp_path, monkeypatch):
    """Before: only train/loss and train/grad_norm were checked, so a diverged probe was
    checkpointed and every resume carried it."""
    import jax.numpy as jnp

    from jaxssl.methods import simclr as simclr_method
    from jaxssl.train import TrainingDiverged

    real_step = simclr_method.simclr_step

    def poisoned(state, views, key, **kwargs):
        new_state, metrics = real_step(state, views, key, **kwargs)
        bad = new_state.step == 3
        metrics = dict(metrics, **{
            "train/online_loss": jnp.where(bad, jnp.nan, metrics["train/online_loss"])})
        return new_state, metrics

    monkeypatch.setattr(simclr_method, "simclr_step", poisoned)
    workdir = _copy(trained, tmp_path)
    with pytest.raises(TrainingDiverged, match="non-finite train/online_loss .* at step 3") as e:
        train.train(tiny_config(*[s for s in STEPS if s[0] != "num_steps"], ("num_steps", "4")),
                    str(workdir), stream=io.StringIO(), allow_config_change=True)
    assert "online_probe_lr" in str(e.value) and "last good checkpoint is step 2" in str(e.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
