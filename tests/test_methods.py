"""The methods package: the registry, each method's step on 8 devices against one device, the
EMA target by its closed form, the config groups and their one-line errors, and training
through the trainer and the CLI: records with the collapse measures, BYOL's logged momentum
schedule, and exact resume after kill -9.

The two-view methods (BYOL, SimSiam, Barlow Twins, VICReg, MoCo v3) share one step scaffold
(`methods.base.two_view_step`); SimCLR's and MoCo v2's steps keep their own tests
(test_steps, test_moco_step, test_sharded).
"""

import functools
import math
from typing import Any
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import configuration, ema, methods, models, optim, parallel, state as state_lib
from jaxssl import steps, train
from jaxssl.configuration import ConfigError
from jaxssl.evaluate import diagnostics
from tiny import IMAGE, assert_leaves_close, copy, views

NEW = ["byol", "simsiam", "barlow_twins", "vicreg", "mocov3"]

# Each method's step with its loss's keywords; momentum 0.9 moves the target visibly.
STEP_KWARGS = {
    "byol": lambda: {"momentum_fn": ema.constant_momentum(0.9)},
    "simsiam": lambda: {},
    "barlow_twins": lambda: {"lambd": 0.02, "scale_loss": 0.5},
    "vicreg": lambda: {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0},
    "mocov3": lambda: {"momentum_fn": ema.constant_momentum(0.9), "temperature": 0.2},
}


def test_the_registry_names_every_method_once_with_its_parts():
    assert list(methods.METHODS) == ["simclr", "moco", "byol", "simsiam", "barlow_twins",
                                     "vicreg", "mocov3"]
    for name, m in methods.METHODS.items():
        assert m.name == name and callable(m.step) and callable(m.bind)
    # The public steps are the registry's, importable from jaxssl.steps as before.
    assert steps.simclr_step is methods.get("simclr").step
    assert steps.moco_step is methods.get("moco").step
    assert {m.name for m in methods.METHODS.values() if m.predictor} == {
        "byol", "simsiam", "mocov3"}
    assert {m.name for m in methods.METHODS.values() if m.contrastive} == {
        "simclr", "moco", "mocov3"}
    with pytest.raises(ValueError, match="unknown method 'dino'; choose one of simclr, moco"):
        methods.get("dino")


def test_each_method_owns_its_config_group_and_its_one_line_errors():
    c = configuration.default_config()
    for name, m in methods.METHODS.items():
        assert (name in c) == (m.config_group is not None), name
    assert c.byol.momentum == 0.996 and c.byol.momentum_schedule == "cosine"
    assert c.mocov3.temperature == 0.2 and c.barlow_twins.lambd == 0.0051
    assert configuration.METHODS["barlow_twins"] == "Barlow Twins"
    bad = [("byol.momentum", "1.5", "byol.momentum must lie in [0, 1]"),
           ("mocov3.momentum_schedule", "linear", "unknown mocov3.momentum_schedule 'linear'"),
           ("mocov3.temperature", "0.0", "mocov3.temperature must be positive"),
           ("barlow_twins.scale_loss", "0.0", "barlow_twins.scale_loss must be positive"),
           ("vicreg.std_coeff", "-1.0", "vicreg.std_coeff must be >= 0"),
           ("method", "byl", "unknown method 'byl'; did you mean 'byol'")]
    for field, value, message in bad:
        config = configuration.load_config("demo")
        # A group is checked when its method is the one that runs.
        method = field.split(".")[0] if "." in field else "simclr"
        configuration.apply_overrides(config, [("method", method), (field, value)])
        with pytest.raises(ConfigError) as e:
            configuration.validate(config)
        assert message in str(e.value) and "\n" not in str(e.value), (field, str(e.value))
    # The predictor's own learning rate needs a predictor.
    config = configuration.load_config("demo")
    configuration.apply_overrides(config, [("optim.fixed_predictor_lr", "true")])
    with pytest.raises(ConfigError, match="optim.fixed_predictor_lr is for a method with a "
                                          r"predictor \(byol, simsiam, mocov3\); simclr has none"):
        configuration.validate(config)


class _Backbone(nn.Module):
    """A conv, BatchNorm over the mesh axis when training, ReLU and a mean: a backbone that
    compiles in a second, with the batch statistics that sharding must get right."""

    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), strides=(2, 2), dtype=self.dtype, param_dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=self.bn_axis_name if train else None, dtype=self.dtype,
                         param_dtype=self.dtype)(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


def _small_model(predictor: bool, bn_axis_name=None, dtype=jnp.float32):
    head = functools.partial(models.ProjectionHead, hidden_dims=(16,), out_dim=8,
                             bn_axis_name=bn_axis_name, dtype=dtype)
    return models.ContrastiveModel(_Backbone(bn_axis_name, dtype), head(),
                                   head() if predictor else None)


def _state(name, tx, model, dtype=None):
    params, batch_stats = models.init_variables(model, jax.random.key(0), (1, IMAGE, IMAGE, 3))
    if dtype is not None:
        params, batch_stats = jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, batch_stats))
    ms = None
    if name in ("byol", "mocov3"):
        # A target that differs from the online network, as after some training.
        ms = state_lib.momentum_encoder(jax.tree.map(lambda p: p * 0.9, params), batch_stats)
    return state_lib.create_train_state(params, batch_stats, tx, method_state=ms)


def _run(name, tx, batch, n_steps, mesh=None, float64=False):
    """n_steps of the method's step on the tiny model (global BN), on one device or sharded."""
    mode = parallel.BN_MODES["global"]
    dtype = jnp.float64 if float64 else jnp.float32
    batch = tuple(np.asarray(x, dtype) for x in batch)
    model = _small_model(methods.get(name).predictor,
                         mode.model_axis_name if mesh else None, dtype)
    st = _state(name, tx, model, jnp.float64 if float64 else None)
    fn = functools.partial(methods.get(name).step, apply_fn=models.flax_apply_fn(model), tx=tx,
                           **STEP_KWARGS[name]())
    if mesh is None:
        step = jax.jit(fn)
    else:
        step = parallel.compile_step(fn, mesh)
        st = jax.device_put(st, parallel.replicated(mesh))
        batch = parallel.host_to_global(batch, mesh)
    history = []
    for _ in range(n_steps):
        st, m = step(st, batch, jax.random.key(0))
        history.append(copy(m))
    return st, history


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.mark.parametrize("name", NEW)
def test_two_steps_on_8_devices_equal_one_device_in_float64(mesh, name):
    """Every batch statistic (BatchNorm's, Barlow Twins' standardisation and cross-correlation,
    VICReg's variance and covariance, MoCo v3's keys) must be over the global batch: in float64
    8 devices agree with one to 1e-10 (test_losses_ssl shows each loss alone does, and that a
    per-device statistic would not)."""
    tx = optim.make_optimizer("lars", 0.1, weight_decay=1e-4)
    with jax.enable_x64(True):
        ref, ref_metrics = _run(name, tx, views(16), 2, float64=True)
        got, metrics = _run(name, tx, views(16), 2, mesh, float64=True)
        assert jax.tree.leaves(got.params)[0].dtype == jnp.float64
    for m, r in zip(metrics, ref_metrics):
        assert set(m) == set(r)
        for key in r:  # metrics reported in float32 (the gradient norm, ...) to its rounding
            rtol = 1e-10 if r[key].dtype == np.float64 else 1e-6
            np.testing.assert_allclose(m[key], r[key], rtol=rtol, atol=1e-12, err_msg=key)
    assert int(got.step) == 2
    # Against the tree's norm: the bias of the projection's last layer feeds the predictor's
    # BatchNorm, which takes any shift away, so its gradient is 0 up to rounding (1e-17).
    for a, b in ((got.params, ref.params), (got.batch_stats, ref.batch_stats),
                 (got.opt_state, ref.opt_state), (got.method_state, ref.method_state)):
        if b is not None:
            assert_leaves_close(a, b, rtol=1e-10, scale="tree")


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_the_target_is_the_ema_of_the_online_network_and_gets_no_gradient(name):
    """After one step: target = m * target + (1 - m) * new online parameters, leaf by leaf (the
    closed form of the EMA), with m from the schedule; m = 1 leaves the target unchanged."""
    tx = optim.make_optimizer("sgd", 0.05, momentum=0.9)
    model = _small_model(predictor=True)
    st0 = _state(name, tx, model)
    x = views(16)
    for m in (0.9, 1.0):
        kwargs = dict(STEP_KWARGS[name](), momentum_fn=ema.constant_momentum(m))
        st1, metrics = jax.jit(functools.partial(
            methods.get(name).step, apply_fn=models.flax_apply_fn(model), tx=tx, **kwargs))(
                st0, x, jax.random.key(0))
        assert float(metrics["train/ema_momentum"]) == pytest.approx(m)
        want = jax.tree.map(lambda t, o: m * np.asarray(t) + (1 - m) * np.asarray(o),
                            st0.method_state["momentum_params"], st1.params)
        for a, b in zip(jax.tree.leaves(st1.method_state["momentum_params"]),
                        jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
        assert not np.allclose(jax.tree.leaves(st1.params)[0], jax.tree.leaves(st0.params)[0])


def test_collapse_is_said_in_one_line():
    assert diagnostics.collapse_message(0.05, 40.0, 128) is None
    msg = diagnostics.collapse_message(1e-4, 1.01, 128)
    assert msg.startswith("the representation has collapsed") and "\n" not in msg
    assert "RankMe) 1.01 of 128" in msg
    assert diagnostics.collapse_message(0.05, 1.2, 128) is not None  # one line of features
    # A dimensional collapse: SimSiam's demo settings on CIFAR-10 once ended at RankMe 3.06 of
    # 128 (std 0.009); a random initialisation of the same model spans 29.6 (std 0.0235).
    partly = diagnostics.collapse_message(0.009, 3.06, 128)
    assert partly.startswith("the representation has partly collapsed: its features span "
                             "about 3.06 of 128 dimensions") and "\n" not in partly
    assert diagnostics.collapse_message(0.0235, 29.6, 128) is None
    assert diagnostics.collapse_message(0.05, 8.1, 128) is None  # the bound: D / 16 = 8
    assert diagnostics.collapse_message(0.05, 7.9, 128) is not None
    collapsed = np.tile(np.random.default_rng(0).normal(size=(1, 32)), (64, 1))
    health = jax.device_get(diagnostics.feature_health(collapsed + 1e-6 * np.arange(64)[:, None]))
    assert diagnostics.collapse_message(float(health["feature_std"]), float(health["rankme"]),
                                        32) is not None


def test_feature_health_equals_the_plain_measures():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 24)) * np.linspace(0.1, 3, 24)
    health = jax.device_get(diagnostics.feature_health(z.astype(np.float32)))
    assert float(health["rankme"]) == pytest.approx(float(diagnostics.rankme(z)), rel=1e-5)
    assert float(health["feature_std"]) == pytest.approx(float(diagnostics.normalized_std(z)),
                                                         rel=1e-5)
    # Features of rank 1 and 2 in 256 dimensions: the Gram matrix's rounding must not read
    # as rank (it did, 1.6 for rank 1, before eigenvalues within it were taken as 0), or a
    # collapse would go unseen.
    for rank in (1, 2):
        low = (rng.normal(size=(1000, rank)) @ rng.normal(size=(rank, 256))).astype(np.float32)
        got = float(jax.device_get(jax.jit(diagnostics.feature_health)(low))["rankme"])
        assert got == pytest.approx(float(diagnostics.rankme(low.astype(np.float64))), abs=0.01)
    assert diagnostics.collapse_message(0.05, got, 256).startswith(
        "the representation has partly collapsed")  # rank 2: not one line, but 2 of 256
    one = float(jax.device_get(diagnostics.feature_health(low[:, :1] * np.ones((1, 256))))[
        "rankme"])
    assert diagnostics.collapse_message(0.05, one, 256) is not None


# --- exact resume after kill -9, through the CLI, for every new method ---------------------

# 12 steps with a checkpoint every 3: the kill comes at the first, with 9 steps left to run.
RESUME = [("num_steps", "12"), ("checkpoint_every_steps", "3"), ("eval_every_steps", "12"),
          ("model.predictor_hidden_dims", "(16,)")]


# SimCLR's kill -9 test is in test_train; MoCo v2's state (key encoder, queue) resumes there too,
# through a stop and a checkpoint in the layout before this package.
@pytest.mark.parametrize("name", NEW)
def test_kill_9_then_resume_is_bitwise_identical(tmp_path, name):
    from test_train import (_wait_for_checkpoint, assert_same_state, cli_args,
                            records_without_timing, tiny_config)

    # The kNN monitor (and its compilation) for BYOL only: it is the same for every method.
    # SimSiam's with its predictor's own learning rate: an optimizer state in two groups.
    extra = ([("method", name), *RESUME] + ([] if name == "byol" else [("eval.knn", "false")])
             + ([("optim.fixed_predictor_lr", "true")] if name == "simsiam" else []))
    reference = train.train(tiny_config(*extra), str(tmp_path / "straight"))
    assert reference.status == "done" and reference.step == 12
    if name == "simsiam":  # the predictor's own optimizer next to the rest's
        assert set(reference.state.opt_state.inner_states) == {"", "predictor"}
    records = records_without_timing(str(tmp_path / "straight"))
    # The collapse measures go with every kNN evaluation; alignment and uniformity with the
    # contrastive methods' train metrics, the embeddings' std with the two-view methods'.
    evals = [r for r in records if "eval/knn_top1" in r]
    assert [r["step"] for r in evals] == ([0, 12] if name == "byol" else [])
    for r in evals:
        assert 0 < r["eval/feature_std"] < 1 and 1 <= r["eval/rankme"] <= 64
    assert ("train/embedding_std" in records[-1]) == (name in NEW)
    contrastive = methods.get(name).contrastive
    assert ("train/uniformity" in records[-1]) == contrastive
    assert ("train/contrastive_top1" in records[-1]) == contrastive
    if name == "byol":
        # The logged momentum is the cosine closed form 1 - (1 - 0.996) (cos(pi t / T) + 1) / 2
        # at the step t it was used at (the metric of step s was computed with t = s - 1).
        logged = [(r["step"], r["train/ema_momentum"]) for r in records
                  if "train/ema_momentum" in r]
        assert [s for s, _ in logged] == [2, 4, 6, 8, 10, 12]
        for s, m in logged:
            assert m == pytest.approx(1 - 0.004 * (math.cos(math.pi * (s - 1) / 12) + 1) / 2,
                                      rel=1e-6)
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "jaxssl"] + cli_args(workdir, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(proc, workdir)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    done = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert done and max(map(int, done)) < 12
    resumed = train.train(tiny_config(*extra), workdir)
    assert resumed.status == "done" and resumed.step == 12
    assert_same_state(reference.state, resumed.state)
    assert records_without_timing(workdir) == records_without_timing(str(tmp_path / "straight"))


def test_the_demo_runs_any_method_with_its_short_run_settings():
    for name in methods.METHODS:
        config = configuration.load_config(f"demo:{name}")
        configuration.validate(config)
        assert config.method == name
    assert configuration.load_config("demo:byol").byol.momentum == 0.99
    assert configuration.load_config("demo").method == "simclr"
    with pytest.raises(ConfigError, match="unknown method 'dino' for the demo; choose one of"):
        configuration.load_config("demo:dino")


def test_embedding_std_and_alignment_uniformity_against_numpy(mesh):
    """The step metrics of the collapse measures, by hand in float64 numpy, and the same on 8
    devices (each row paired with every other row of the global batch)."""
    from jaxssl.methods import base

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 32, 6))
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    want_std = np.mean(np.std(na, axis=0))
    want_align = np.mean(np.sum((na - nb) ** 2, axis=1))
    sq = np.sum((na[:, None] - na[None]) ** 2, axis=-1)
    off = ~np.eye(32, dtype=bool)
    want_uniform = np.log(np.mean(np.exp(-2 * sq[off])))
    with jax.enable_x64(True):
        got = jax.jit(lambda a, b: (base.embedding_std(a), *base.alignment_uniformity(a, b)))(a, b)
        sharded = jax.jit(jax.shard_map(
            lambda a, b: (base.embedding_std(a, "data"),
                          *base.alignment_uniformity(a, b, axis_name="data")),
            mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))(a, b)
    for values in (got, sharded):
        np.testing.assert_allclose([float(v) for v in values],
                                   [want_std, want_align, want_uniform], rtol=1e-6)
