"""The online linear probe: one update against numpy float64, the encoder's update unchanged by
it (SimCLR and MoCo), and 8 devices equal one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxssl import ema, models, optim, parallel, probe, queue, state, steps
from tiny import IMAGE, assert_trees_close, copy, tiny_model, views

BATCH = 32
CLASSES = 5


def _softmax_xent_step(w, b, x, y, lr):
    """Reference: one plain SGD step on the mean softmax cross-entropy, float64."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    d = p.copy()
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    return w - lr * x.T @ d, b - lr * d.sum(0), loss, np.mean(logits.argmax(1) == y)


def test_probe_update_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, CLASSES, 40).astype(np.int32)
    tx = optax.sgd(0.5)
    p = probe.init_probe(6, CLASSES, tx)
    # From a non-zero classifier, so a transposed kernel or a dropped bias would show.
    p = p.replace(params={"kernel": jnp.asarray(rng.normal(size=(6, CLASSES)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=CLASSES), jnp.float32)})
    w0, b0 = np.asarray(p.params["kernel"]), np.asarray(p.params["bias"])
    new, metrics = jax.jit(functools.partial(probe.probe_update, tx=tx))(p, x, y)
    w, b, loss, top1 = _softmax_xent_step(w0, b0, x, y, 0.5)
    np.testing.assert_allclose(new.params["kernel"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.params["bias"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["train/online_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["train/online_top1"], top1)


def test_probe_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe.init_probe(8, 1, optax.sgd(0.1))


def _labels(seed=2):
    return np.random.default_rng(seed).integers(0, CLASSES, BATCH).astype(np.int32)


def _simclr(with_probe, bn_axis_name=None):
    model = tiny_model(bn_axis_name=bn_axis_name)
    params, stats = models.init_variables(model, jax.random.key(0), (1, IMAGE, IMAGE, 3))
    tx = optim.make_optimizer("lars", 0.1, weight_decay=1e-4)
    probe_tx = optax.sgd(0.1, momentum=0.9)
    st = state.create_train_state(
        params, stats, tx,
        probe=probe.init_probe(4 * 8, CLASSES, probe_tx) if with_probe else None)
    step = functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx,
                             temperature=0.2, probe_tx=probe_tx if with_probe else None)
    return st, step


def _moco(with_probe):
    model = tiny_model()
    params, stats = models.init_variables(model, jax.random.key(0), (1, IMAGE, IMAGE, 3))
    tx = optim.make_optimizer("sgd", 0.05, weight_decay=5e-4)
    probe_tx = optax.sgd(0.1, momentum=0.9)
    st = state.create_train_state(
        params, stats, tx, with_momentum_encoder=True, queue=queue.init_queue(
            jax.random.key(7), 128, 8),
        probe=probe.init_probe(4 * 8, CLASSES, probe_tx) if with_probe else None)
    step = functools.partial(
        steps.moco_step, apply_fn=models.flax_apply_fn(model), tx=tx, temperature=0.2,
        momentum_fn=ema.constant_momentum(0.9), symmetric=True, shuffle_bn=True,
        probe_tx=probe_tx if with_probe else None)
    return st, step


@pytest.mark.parametrize("build", [_simclr, _moco], ids=["simclr", "moco"])
def test_probe_never_changes_the_encoder_update(build):
    runs = {}
    for with_probe in (False, True):
        st, step = build(with_probe)
        step = jax.jit(step)
        for i in range(2):
            x1, x2 = views(BATCH, seed=10 + i)
            st, metrics = step(st, {"views": (x1, x2), "labels": _labels(i)}, jax.random.key(3))
        runs[with_probe] = (copy(st.replace(probe=None)), {k: float(v) for k, v in metrics.items()})
    (plain, m_plain), (probed, m_probed) = runs[False], runs[True]
    # Bitwise: the probe's gradient is stopped, so the encoder's computation is the same program.
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(probed)):
        np.testing.assert_array_equal(a, b)
    assert m_plain["train/loss"] == m_probed["train/loss"]
    assert "train/online_top1" in m_probed and "train/online_top1" not in m_plain
    assert 0.0 <= m_probed["train/online_top1"] <= 1.0


def test_probe_learns_labels_it_can_see():
    """Labels that are a function of the images: the probe's batch accuracy rises above chance."""
    st, step = _simclr(True)
    step = jax.jit(step)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(CLASSES, IMAGE, IMAGE, 3)).astype(np.float32)
    accuracy = []
    for i in range(30):
        y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
        x = base[y] + 0.3 * rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
        st, metrics = step(st, {"views": (x, x[:, :, ::-1]), "labels": y}, jax.random.key(i))
        accuracy.append(float(metrics["train/online_top1"]))
    assert np.mean(accuracy[-5:]) > 0.8, accuracy


def test_probe_without_labels_is_a_clear_error():
    st, step = _simclr(True)
    with pytest.raises(ValueError, match="labels"):
        jax.eval_shape(step, st, views(BATCH), jax.random.key(0))


def test_sharded_probe_equals_single_device():
    mesh = parallel.make_mesh()
    st, single_step = _simclr(True, bn_axis_name=None)
    st_g, sharded_step = _simclr(True, bn_axis_name=parallel.DATA_AXIS)
    sharded_step = parallel.compile_step(sharded_step, mesh, donate_state=False)
    st_g = jax.device_put(st_g, parallel.replicated(mesh))
    single_step = jax.jit(single_step)
    for i in range(2):
        batch = {"views": views(BATCH, seed=10 + i), "labels": _labels(i)}
        st, m1 = single_step(st, batch, jax.random.key(3))
        st_g, m8 = sharded_step(st_g, parallel.host_to_global(batch, mesh), jax.random.key(3))
        for k in ("train/online_loss", "train/online_top1"):
            np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-5, err_msg=k)
    assert_trees_close(copy(st.probe), copy(st_g.probe), rtol=1e-4, atol=1e-6)
