"""`jaxssl train --dry-run` (jaxssl.dryrun) on the tests' tiny config and 8 fake CPU devices:
what it reports against figures computed here, and that it writes nothing."""

import jax
import numpy as np
import pytest

from jaxssl import cli, configuration, dryrun, experiment, models, parallel
from jaxssl.data import pipeline, sources

from test_train import TINY, tiny_config


def _argv(workdir, *extra):
    return (["train", "--config", "demo", "--workdir", str(workdir), "--dry-run"]
            + [f"--config.{k}={v}" for k, v in TINY] + list(extra))


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    mesh = parallel.make_mesh()
    return config, dryrun.report(config, mesh)


def test_report_counts_schedule_memory_and_flops(tiny):
    config, r = tiny
    # Parameters: the sizes of the model's initialised arrays, part by part.
    model, _ = experiment.build_model(config)
    params, _ = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3), jit=True)
    sizes = {k: sum(np.size(x) for x in jax.tree.leaves(v)) for k, v in params.items()}
    assert r["params"] == {**sizes, "total": sum(sizes.values())}
    assert set(sizes) == {"backbone", "head"} and min(sizes.values()) > 0
    # The schedule: 12 steps of batch 16 on the 5,000 built-in images.
    assert (r["steps"], r["steps_per_epoch"], r["images_seen"]) == (12, 5000 // 16, 12 * 16)
    assert r["epochs"] == pytest.approx(12 / (5000 // 16))
    assert (r["devices"], r["per_device_batch"]) == (8, 2)
    # Memory per device: the arguments are the replicated state, this device's 2 images
    # (uint8 32x32x3) and labels, and the key; the state is donated to the output.
    m = r["memory"]
    assert min(m["argument"], m["output"], m["temp"], m["alias"]) > 0
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    exp = experiment.build(config, parallel.make_mesh(), with_eval=False)
    state = jax.eval_shape(lambda: experiment.initial_state(exp))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert m["argument"] >= state_bytes + 2 * 32 * 32 * 3
    assert m["argument"] - state_bytes < 2 * 32 * 32 * 3 + 1024
    assert m["alias"] <= state_bytes
    assert r["fits"] is True  # a few MiB against the host's memory
    # FLOPs: one device's program, times the devices, over the batch.
    assert r["flops_per_device"] > 0
    assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_device"])
    assert r["flops_per_image"] == pytest.approx(r["flops_per_step"] / 16)
    text = dryrun.format_report(r)
    assert f"total {r['params']['total']:,}" in text and "12 steps" in text and "fits:" in text


def test_cli_writes_nothing_and_exits_1_when_the_step_does_not_fit(tmp_path, capsys,
                                                                   monkeypatch, tiny):
    workdir = tmp_path / "w"
    monkeypatch.setattr(dryrun, "_device_memory",
                        lambda devices, stand_in: (1 << 16, "a test's limit"))
    assert cli.main(_argv(workdir)) == 1  # the fixture's step: compiled once, then cached
    out = capsys.readouterr().out
    assert "DOES NOT FIT: needs" in out and "64.00 KiB per device" in out
    assert "8 cpu device(s); batch 16 (2 per device)" in out and "FLOP per image" in out
    assert list(tmp_path.iterdir()) == []  # the workdir is not even created


def test_stand_in_devices_have_no_known_memory(tiny):
    _, r = tiny
    text = dryrun.format_report({**r, "stand_in": True, "fits": None, "device_memory": None,
                                 "device_memory_note": "a stand-in"})
    assert "8 CPU devices standing in for the accelerators" in text
    assert "fits: unknown (a stand-in)" in text
    # The command line's stand-ins are the first N of the devices JAX has started with.
    assert dryrun.cpu_devices(4) == jax.devices()[:4]


@pytest.mark.parametrize("extra, message", [
    (["--config.batch_size=12"], "batch_size 12 is not divisible by the 8 devices"),
    (["--dry_run_devices", "16"], "--dry_run_devices 16: JAX has already started with 8"),
])
def test_cli_refuses_in_one_line(tmp_path, capsys, extra, message):
    workdir = tmp_path / "w"
    assert cli.main(_argv(workdir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not workdir.exists()


def test_resnet50_parameters_are_torchvisions():
    config = configuration.load_config("configs/simclr_imagenet.py")
    model, _ = experiment.build_model(config)
    params, _ = jax.eval_shape(lambda: models.init_variables(
        model, jax.random.key(0), (1, 224, 224, 3)))
    counts = dryrun.parameter_counts(params)
    # torchvision.models.resnet50() without its fc layer.
    assert counts["backbone"] == 23_508_032
    assert counts["total"] == counts["backbone"] + counts["head"] > 23_508_032


def test_batch_spec_is_the_pipelines_batch():
    source = sources.load_builtin("train")
    spec = pipeline.batch_spec(source, global_batch=16, mode="device", out_size=16)
    batch = next(pipeline.make_pipeline(source, global_batch=16, seed=0, mode="device",
                                        num_steps=1))
    assert jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), spec) == jax.tree.map(
        lambda x: (x.shape, x.dtype), batch)
    views = pipeline.batch_spec(source, global_batch=16, mode="split", out_size=24)["views"]
    assert [(v.shape, v.dtype) for v in views] == [((16, 24, 24, 3), np.uint8)] * 2
