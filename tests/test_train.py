"""The trainer end to end on 8 fake CPU devices: outputs, exact resume, kill -9, SIGTERM, NaN.

A tiny ResNet on 16 px views of the built-in data keeps each run to seconds. Runs that must be
killed run in a subprocess (`python -m jaxssl train`); the others in this process.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import checkpoint, cli, configuration, state, steps, train
from jaxssl.methods import simclr as simclr_method

TINY = [
    ("num_steps", "12"), ("batch_size", "16"), ("log_every_steps", "2"),
    ("eval_every_steps", "6"), ("checkpoint_every_steps", "3"),
    ("model.width", "4"), ("model.head_hidden_dims", "(16,)"), ("model.out_dim", "8"),
    ("data.out_size", "16"), ("eval.bank_examples", "400"), ("eval.query_examples", "160"),
    ("eval.batch_size", "160"), ("eval.knn_k", "20"),
]


def tiny_config(*extra):
    config = configuration.load_config("demo")
    configuration.apply_overrides(config, TINY + list(extra))
    return config


def cli_args(workdir, *extra):
    return (["train", "--config", "demo", "--workdir", str(workdir)]
            + [f"--config.{k}={v}" for k, v in TINY + list(extra)])


def records_without_timing(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("train/images_per_sec", None)
    return records


def assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore_final(workdir, template):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.latest_step(), ckpt.restore(template)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """12 steps in one go: the reference every interrupted run must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp("straight")
    result = train.train(tiny_config(), str(workdir))
    assert result.status == "done" and result.step == 12
    return result, records_without_timing(workdir)


def test_cli_writes_every_output(tmp_path, capsys):
    workdir = tmp_path / "run"
    # The host (tf.data) augmentation path end to end; the other runs here augment on the device.
    assert cli.main(cli_args(workdir, ("num_steps", "4"), ("data.augment", "host"))) == 0
    out = capsys.readouterr().out
    assert "kNN top-1 at initialisation" in out
    assert "trained" in out and "at random initialisation" in out
    names = set(os.listdir(workdir))
    assert {"metrics.jsonl", "config.json", "checkpoints", "augment_preview.png", "curves.png",
            "tensorboard"} <= names
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert set(records[0]) == {"step", "epoch", "eval/knn_top1", "eval/feature_std", "eval/rankme"}
    assert records[0]["step"] == 0 and records[0]["epoch"] == 0.0
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records[1:]:
        for key in ("epoch", "train/loss", "train/lr", "train/images_per_sec",
                    "train/contrastive_top1", "train/grad_norm"):
            assert np.isfinite(r[key]), key
    assert "eval/knn_top1" in records[-1] and 0.0 <= records[-1]["eval/knn_top1"] <= 1.0
    assert records[1]["epoch"] == pytest.approx(2 / (5000 // 16))
    config = json.load(open(workdir / "config.json"))
    assert config["num_steps"] == 4 and config["data"]["augment"] == "host"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
    from PIL import Image

    for png in ("augment_preview.png", "curves.png"):
        assert Image.open(workdir / png).size[0] > 100
    # TensorBoard's own reader (TensorFlow's) sees the scalars of every logged step.
    from jaxssl.data.tf_import import tf

    (event_file,) = os.listdir(workdir / "tensorboard")
    seen = {}
    for raw in tf().data.TFRecordDataset(str(workdir / "tensorboard" / event_file)):
        event = tf().compat.v1.Event.FromString(raw.numpy())
        for value in event.summary.value:
            seen.setdefault(value.tag, {})[event.step] = value.simple_value
    assert set(seen["train/loss"]) == {2, 4}
    assert seen["train/loss"][4] == pytest.approx(records[2]["train/loss"])
    assert set(seen["eval/knn_top1"]) == {0, 4}


def test_the_learning_rate_logged_is_the_schedule(straight):
    _, records = straight
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    # demo: AdamW, warmup of one epoch (312 steps at batch 16) longer than 12 steps: linear.
    peak = tiny_config().optim.base_lr
    steps_logged = [r["step"] for r in records if "train/lr" in r]
    np.testing.assert_allclose(lrs, [peak * (s - 1) / 12 for s in steps_logged], rtol=1e-6)


def _as_written_before_the_methods_package(workdir, state_now, step):
    """The workdir as jaxssl wrote it before its methods package: the checkpoint in the old
    layout (momentum_params, momentum_batch_stats and queue fields, None for SimCLR) and a
    config.json without the fields added since (the predictor, the new methods' groups)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(ckpt_dir, str(step)))
    ckpt = checkpoint.Checkpointer(ckpt_dir, async_save=False)
    ckpt.save(step, state.to_legacy(state_now))
    ckpt.close()
    assert {"momentum_params", "queue"} <= checkpoint.Checkpointer(ckpt_dir).saved_fields(step)
    path = os.path.join(workdir, "config.json")
    config = json.load(open(path))
    for group in ("byol", "barlow_twins", "vicreg", "mocov3"):
        del config[group]
    del config["model"]["predictor_hidden_dims"]
    with open(path, "w") as f:
        json.dump(config, f)


def test_resume_after_a_stop_is_bitwise_identical(straight, tmp_path):
    """Through a workdir as jaxssl wrote it before the methods package, too: it resumes with
    no config change reported and the checkpoint converted."""
    reference, reference_records = straight
    workdir = str(tmp_path / "resumed")
    first = train.train(tiny_config(), workdir, stop_at_step=6)
    assert first.status == "stopped" and first.step == 6
    _as_written_before_the_methods_package(workdir, first.state, 6)
    second = train.train(tiny_config(), workdir)
    assert second.status == "done" and second.step == 12
    assert_same_state(reference.state, second.state)
    assert records_without_timing(workdir) == reference_records
    assert second.knn_top1 == reference.knn_top1
    assert second.knn_top1_init == reference.knn_top1_init
    # Running the finished run again changes nothing and says it is done.
    again = train.train(tiny_config(), workdir)
    assert again.status == "done" and again.step == 12
    assert records_without_timing(workdir) == reference_records


def test_a_stop_during_the_knn_monitor_is_taken_at_once_and_resumes_exactly(
        straight, tmp_path, monkeypatch, capsys):
    """Before: a SIGTERM during the kNN monitor was acted on after the whole evaluation and one
    more step (at ImageNet scale far beyond a preempted TPU VM's ~30 s). Now the evaluation
    stops before its next batch, the step is saved without it, and the resumed run evaluates
    it first: the log and the state equal an uninterrupted run's. The signal is stood in for by
    setting the trainer's stop request (a real SIGTERM is test_sigterm_saves_...)."""
    from jaxssl.evaluate.features import FeatureExtractor

    reference, reference_records = straight
    requests, calls = [], []
    real_enter, real_call = train.StopRequest.__enter__, FeatureExtractor.__call__

    def enter(self):
        requests.append(self)
        return real_enter(self)

    def call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            requests[-1].signal_name = "SIGTERM"
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(train.StopRequest, "__enter__", enter)
    monkeypatch.setattr(FeatureExtractor, "__call__", call)
    workdir = str(tmp_path / "run")
    # 1. During the monitor at step 6 (passes 1-2 at initialisation, 3 is step 6's bank).
    interrupt_at = 3
    second = train.train(tiny_config(), workdir)
    assert second.status == "preempted" and second.step == 6 and len(calls) == 3
    assert "received SIGTERM: saved a checkpoint at step 6 in " in capsys.readouterr().out
    six = [r for r in records_without_timing(workdir) if r["step"] == 6]
    assert len(six) == 1 and "eval/knn_top1" not in six[0] and "train/loss" in six[0]
    # 2. The resume evaluates step 6 first, then trains to the end.
    interrupt_at = 0
    third = train.train(tiny_config(), workdir)
    assert third.status == "done" and third.step == 12
    assert "kNN top-1 at step 6 (its evaluation was interrupted)" in capsys.readouterr().out
    assert records_without_timing(workdir) == reference_records
    assert_same_state(reference.state, third.state)


def test_resume_with_the_online_probe_switched_on_or_off(straight, tmp_path, capsys):
    """A run started without the probe (as before it existed) resumes with it: the encoder goes
    on exactly (the probe never touches it), the probe starts afresh; and the other way round."""
    reference, _ = straight  # trained with the probe (the default)
    no_knn = ("eval.knn", "false")  # the monitor does not touch the state compared
    for first_on, second_on in (("false", "true"), ("true", "false")):
        workdir = str(tmp_path / f"probe_{first_on}")
        train.train(tiny_config(("eval.online_probe", first_on), no_knn), workdir, stop_at_step=6)
        done = train.train(tiny_config(("eval.online_probe", second_on), no_knn), workdir)
        assert done.status == "done" and done.step == 12
        assert "online probe does not match" in capsys.readouterr().out
        assert_same_state(reference.state.replace(probe=None), done.state.replace(probe=None))
        assert (done.state.probe is None) == (second_on == "false")


def _wait_for_checkpoint(proc, workdir, timeout=300):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint:\n{proc.stdout.read()}")
        if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
            return ckpt_dir
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def _spawn(workdir):
    return subprocess.Popen([sys.executable, "-m", "jaxssl"] + cli_args(workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_at_a_random_moment_then_resume_is_bitwise_identical(straight, tmp_path):
    reference, reference_records = straight
    workdir = str(tmp_path / "killed")
    proc = _spawn(workdir)
    ckpt_dir = _wait_for_checkpoint(proc, workdir)
    # Kill during the next checkpoint write if one is seen, else at a random moment.
    delay = random.Random().uniform(0.0, 1.0)
    deadline, during_write = time.time() + delay, False
    while time.time() < deadline:
        if any("tmp" in d for d in os.listdir(ckpt_dir)):
            during_write = True
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill ({delay:.2f} s)"
    result = train.train(tiny_config(), workdir)
    assert result.step == 12, f"delay {delay:.2f} s, during a write: {during_write}"
    assert_same_state(reference.state, result.state)
    assert records_without_timing(workdir) == reference_records


def test_sigterm_saves_at_the_next_step_and_exits_0(straight, tmp_path):
    reference, reference_records = straight
    workdir = str(tmp_path / "preempted")
    proc = _spawn(workdir)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    stopped_at, _ = restore_final(workdir, reference.state)
    if stopped_at < 12:
        assert f"received SIGTERM: saved a checkpoint at step {stopped_at}" in out
    result = train.train(tiny_config(), workdir)
    assert result.step == 12
    assert_same_state(reference.state, result.state)
    assert records_without_timing(workdir) == reference_records


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(straight, tmp_path,
                                                                     monkeypatch, capsys):
    real_step = steps.simclr_step

    def poisoned(state, views, key, **kwargs):
        new_state, metrics = real_step(state, views, key, **kwargs)
        bad = new_state.step == 5
        metrics = dict(metrics, **{"train/loss": jnp.where(bad, jnp.nan, metrics["train/loss"])})
        params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new_state.params)
        return new_state.replace(params=params), metrics

    monkeypatch.setattr(simclr_method, "simclr_step", poisoned)
    workdir = tmp_path / "nan"
    assert cli.main(cli_args(workdir, ("checkpoint_every_steps", "2"))) == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite train/loss (nan) at step 5" in err
    assert "last good checkpoint is step 4" in err and len(err.splitlines()) == 1
    step, state = restore_final(str(workdir), straight[0].state)
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    logged = [r["step"] for r in records_without_timing(workdir)]
    assert max(logged) == 4


# --- bad input: one line on stderr, exit status 2, nothing trained -------------------------


def _bad(workdir, capsys, *extra, argv=None):
    code = cli.main(argv or cli_args(workdir, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    return err


def test_bad_input_misspelt_field(tmp_path, capsys):
    err = _bad(tmp_path / "w", capsys, ("batch_sise", "16"))
    assert "unknown config field 'batch_sise'; did you mean 'batch_size'?" in err


def test_bad_input_batch_not_divisible_by_devices(tmp_path, capsys):
    err = _bad(tmp_path / "w", capsys, ("batch_size", "12"))
    assert "batch_size 12" in err and "8 devices" in err


def test_bad_input_unknown_dataset(tmp_path, capsys):
    err = _bad(tmp_path / "w", capsys, ("data.source", "imagenet"))
    assert "unknown data.source 'imagenet'" in err
    err = _bad(tmp_path / "w", capsys, ("data.source", "tfds"), ("data.name", "no_such_dataset"))
    assert "no_such_dataset" in err


def test_bad_input_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _bad(blocker / "run", capsys)
    assert "cannot write to workdir" in err


def test_bad_input_workdir_of_another_model(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(cli_args(workdir, ("num_steps", "3"), ("eval.knn", "false"))) == 0
    capsys.readouterr()
    before = sorted(os.listdir(workdir / "checkpoints"))
    code = cli.main(cli_args(workdir, ("num_steps", "3"), ("model.width", "8")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "model.width 4 -> 8" in err and "new workdir" in err  # the config check, first
    # Allowing config changes does not let a checkpoint of another model resume.
    code = cli.main(cli_args(workdir, ("num_steps", "3"), ("model.width", "8"))
                    + ["--allow_config_change"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "different model" in err and "new workdir" in err
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing lost


def test_cli_help_and_python_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxssl", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--config.FIELD=VALUE" in out and "--workdir" in out


MOCO = [("method", "moco"), ("moco.queue_size", "64"), ("moco.symmetric", "true"),
        ("model.bn", "local"), ("moco.bn_groups", "8"), ("num_steps", "8"),
        ("checkpoint_every_steps", "4"), ("eval_every_steps", "8")]


def test_moco_through_the_cli_and_exact_resume_with_key_encoder_and_queue(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert cli.main(cli_args(straight, *MOCO)) == 0
    out = capsys.readouterr().out
    assert "MoCo v2" in out and "at random initialisation" in out
    assert {"metrics.jsonl", "augment_preview.png", "curves.png", "tensorboard"} <= set(
        os.listdir(straight))
    records = records_without_timing(straight)
    assert all(r["train/ema_momentum"] == pytest.approx(0.99) for r in records[1:])
    resumed = str(tmp_path / "resumed")
    first = train.train(tiny_config(*MOCO), resumed, stop_at_step=4)
    assert first.status == "stopped"
    # The checkpoint rewritten in the layout of jaxssl before its methods package (the key
    # encoder and queue as fields of the state): it is read, converted, and resumes exactly.
    ckpt = checkpoint.Checkpointer(os.path.join(resumed, "checkpoints"), async_save=False)
    legacy = state.to_legacy(ckpt.restore(first.state, 4))
    ckpt.close()
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    ckpt = checkpoint.Checkpointer(os.path.join(resumed, "checkpoints"), async_save=False)
    ckpt.save(4, legacy)
    ckpt.close()
    assert "['method_state']" in str(checkpoint.Checkpointer(
        os.path.join(resumed, "checkpoints")).difference(first.state, 4))
    second = train.train(tiny_config(*MOCO), resumed)
    assert "state layout of jaxssl before its methods package" in capsys.readouterr().out
    step, reference = restore_final(str(straight), second.state)
    assert step == 8 and int(second.state.method_state["queue"].ptr) == (8 * 2 * 16) % 64
    assert second.state.method_state["momentum_params"] is not None
    assert_same_state(reference, second.state)  # params, key encoder, queue, optimizer
    assert records_without_timing(resumed) == records


def test_bad_input_moco_queue_and_momentum(tmp_path, capsys):
    err = _bad(tmp_path / "w", capsys, *MOCO, ("moco.queue_size", "48"))
    assert "moco.queue_size (48) must be a positive multiple" in err and "32" in err
    err = _bad(tmp_path / "w", capsys, *MOCO, ("moco.momentum", "1.5"))
    assert "moco.momentum must lie in [0, 1]" in err
