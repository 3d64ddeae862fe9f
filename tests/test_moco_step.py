"""moco_step: shuffle BN on 8 devices equals split BN with 8 groups on one device, global BN on
8 devices equals one device, the EMA and the queue after a step."""

import functools

import jax
import numpy as np
import pytest

from jaxssl import ema, models, optim, parallel, queue, state, steps
from tiny import IMAGE, assert_trees_close, copy, tiny_model, views

BATCH = 64


def _setup(bn_axis_name=None, queue_size=256, seed=0):
    model = tiny_model(bn_axis_name=bn_axis_name)
    params, batch_stats = models.init_variables(model, jax.random.key(seed), (1, IMAGE, IMAGE, 3))
    tx = optim.make_optimizer("sgd", 0.01, weight_decay=5e-4, momentum=0.9)
    q = queue.init_queue(jax.random.key(7), queue_size, 8)
    st = state.create_train_state(params, batch_stats, tx, with_momentum_encoder=True, queue=q)
    # A key encoder that differs from the query encoder, as after some training.
    ms = st.method_state
    st = st.replace(method_state={
        **ms, "momentum_params": jax.tree.map(lambda p: p * 0.9, ms["momentum_params"])})
    return model, tx, st


def _run(step_fn, st, n_steps, mesh=None):
    history = []
    for i in range(n_steps):
        x1, x2 = views(BATCH, seed=10 + i)
        batch = (x1, x2) if mesh is None else parallel.host_to_global((x1, x2), mesh)
        st, metrics = step_fn(st, batch, jax.random.key(3))
        history.append({k: float(v) for k, v in metrics.items()})
    return copy(st), history


def _assert_sharded_equals_single(sharded_step, mesh, st0, single, hist_single):
    """Two sharded steps from st0 give the single-device metrics and state (float32 rounding)."""
    sharded, hist_sharded = _run(sharded_step, jax.device_put(st0, parallel.replicated(mesh)), 2,
                                 mesh)
    for a, b in zip(hist_single, hist_sharded):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    assert_trees_close(single, sharded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_shuffle_bn_on_8_devices_equals_split_bn_with_8_groups(symmetric):
    model, tx, st0 = _setup()
    common = dict(tx=tx, temperature=0.2, momentum_fn=ema.constant_momentum(0.9),
                  symmetric=symmetric, shuffle_bn=True)
    # One device: every BN sees 8 groups of 2 images, the key encoder the shuffled batch.
    one = jax.jit(functools.partial(
        steps.moco_step, apply_fn=models.split_bn_apply_fn(models.flax_apply_fn(model), 8),
        **common))
    single, hist_single = _run(one, st0, 2)
    # 8 devices with per-device BN: each normalises its 2 images; keys after the same shuffle.
    mesh = parallel.make_mesh()
    sharded_step = parallel.compile_step(functools.partial(
        steps.moco_step, apply_fn=models.flax_apply_fn(model), average_batch_stats=True,
        **common), mesh, donate_state=False)
    _assert_sharded_equals_single(sharded_step, mesh, st0, single, hist_single)


def test_global_bn_on_8_devices_equals_one_device():
    model, tx, st0 = _setup()
    common = dict(tx=tx, temperature=0.2, momentum_fn=ema.constant_momentum(0.9))
    one = jax.jit(functools.partial(steps.moco_step, apply_fn=models.flax_apply_fn(model),
                                    **common))
    single, hist_single = _run(one, st0, 2)
    mesh = parallel.make_mesh()
    global_model = tiny_model(bn_axis_name=parallel.DATA_AXIS)
    sharded_step = parallel.compile_step(functools.partial(
        steps.moco_step, apply_fn=models.flax_apply_fn(global_model), **common), mesh,
        donate_state=False)
    _assert_sharded_equals_single(sharded_step, mesh, st0, single, hist_single)


def test_ema_and_queue_after_one_step():
    model, tx, st0 = _setup()
    apply_fn = models.flax_apply_fn(model)

    def step(m, symmetric):
        fn = jax.jit(functools.partial(steps.moco_step, apply_fn=apply_fn, tx=tx,
                                       temperature=0.2, momentum_fn=ema.constant_momentum(m),
                                       symmetric=symmetric))
        x1, x2 = views(BATCH)
        return fn(st0, (x1, x2), jax.random.key(3))

    frozen, metrics = step(1.0, False)
    assert float(metrics["train/ema_momentum"]) == 1.0
    # The optimizer moved the query encoder; the key encoder (m = 1) did not move at all, so no
    # gradient reached it. (Read through TrainState's properties, as before method_state.)
    assert not np.allclose(np.asarray(jax.tree.leaves(frozen.params)[0]),
                           np.asarray(jax.tree.leaves(st0.params)[0]))
    for a, b in zip(jax.tree.leaves(frozen.momentum_params), jax.tree.leaves(st0.momentum_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The queue: the keys of x2 (unit rows) went into rows [0, 16); the rest is untouched.
    assert int(frozen.queue.ptr) == BATCH
    x1, x2 = views(BATCH)
    out, _ = apply_fn(st0.momentum_params, st0.momentum_batch_stats, x2, train=True)
    want = np.array(out["projection"])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(frozen.queue.keys[:BATCH]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(frozen.queue.keys[BATCH:]),
                                  np.asarray(st0.queue.keys[BATCH:]))
    symmetric, _ = step(0.99, True)
    assert int(symmetric.queue.ptr) == 2 * BATCH
