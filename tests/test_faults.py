"""Faults a long run must survive or refuse cleanly (issue 14): a checkpoint of another model,
a damaged latest checkpoint. Each case runs the trainer on the tiny demo model against a copy
of one trained workdir (2 steps, a checkpoint after each)."""

import io
import os
import shutil

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.checkpoint import Checkpointer
from jaxssl.configuration import ConfigError
from test_train import tiny_config

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



@pytest.mark.parametrize("field,value", [("model.encoder", "resnet34"), ("model.out_dim", "16"),
                                         ("method", "moco")])
def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path, field, value):
    """Before: every mismatch was taken for an online-probe change and a partial restore
    trained a ResNet-18 from part of a ResNet-34's weights, exit 0."""
    workdir = _copy(trained, tmp_path)
    before = {os.path.relpath(os.path.join(r, n), workdir): os.path.getmtime(os.path.join(r, n))
              for r, _, ns in os.walk(workdir) for n in ns}
    with pytest.raises(ConfigError, match="step 2 .* is of a different model") as e:
        train.train(tiny_config(*STEPS, (field, value)), str(workdir), stream=io.StringIO())
    assert "\n" not in str(e.value)
    after = {os.path.relpath(os.path.join(r, n), workdir): os.path.getmtime(os.path.join(r, n))
             for r, _, ns in os.walk(workdir) for n in ns}
    assert after == before  # nothing written, nothing removed


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
