"""Sharded computations on 8 fake CPU devices against the single-device result."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import losses, models, parallel, steps
from tiny import (as_float64, assert_leaves_close, assert_trees_close, copy, lars, tiny_model,
                  tiny_state, views)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest.py must give 8 fake CPU devices"
    return parallel.make_mesh()


@pytest.mark.parametrize("per_device,dim,temperature", [(1, 4, 0.5), (3, 16, 0.1), (8, 32, 0.2)])
def test_sharded_info_nce_equals_single_device(mesh, per_device, dim, temperature):
    rng = np.random.default_rng(per_device)
    n = 8 * per_device
    z1 = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    z2 = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)

    def value_and_grads(z1, z2, axis_name):
        def f(z1, z2):
            return losses.info_nce_with_accuracy(z1, z2, temperature=temperature, axis_name=axis_name)
        (loss, acc), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z1, z2)
        return loss, acc, grads

    sharded = jax.jit(jax.shard_map(
        functools.partial(value_and_grads, axis_name=parallel.DATA_AXIS),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=(P(), P(), P("data")),
    ))
    loss, acc, grads = sharded(z1, z2)
    ref_loss, ref_acc, ref_grads = jax.jit(functools.partial(value_and_grads, axis_name=None))(z1, z2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(acc, ref_acc, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    # Gradients really cross devices: a view's gradient includes its role as a negative of
    # rows on other devices, so computing each shard's loss alone gives different gradients.
    alone = jax.grad(lambda a, b: losses.info_nce(a, b, temperature=temperature))(z1[:per_device], z2[:per_device])
    assert not np.allclose(alone, ref_grads[0][:per_device], rtol=1e-3)


def _steps(tx, batch, n_steps, key, mesh=None, float64=False):
    """n_steps SimCLR steps of the tiny model with global BN: on one device (mesh None) or
    sharded over mesh; in float64 (inside jax.enable_x64) when asked."""
    mode = parallel.BN_MODES["global"]
    kw = {"dtype": jnp.float64} if float64 else {}
    model = tiny_model(bn_axis_name=mode.model_axis_name if mesh else None, **kw)
    st = tiny_state(tx)
    if float64:
        st = as_float64(st, tx)
        batch = tuple(np.asarray(x, np.float64) for x in batch)
    fn = functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx,
                           temperature=0.2)
    if mesh is None:
        step = jax.jit(fn)
    else:
        step = parallel.compile_step(
            functools.partial(fn, average_batch_stats=mode.average_batch_stats), mesh)
        st = jax.device_put(st, parallel.replicated(mesh))
        batch = parallel.host_to_global(batch, mesh)
        assert batch[0].sharding.spec == P("data")
    history = []
    for _ in range(n_steps):
        st, m = step(st, batch, key)
        history.append(copy(m))
    return st, history


def test_three_global_bn_steps_in_float64_equal_one_device(mesh):
    """The sharded step is the single-device step's function: in float64, where rounding is
    1e-16, 3 LARS steps on 8 devices agree with one device to 1e-12 (measured: 5e-16 in the
    parameters' norm). A missing or wrong reduction over devices would show at 1e-3 or more."""
    tx = lars()
    with jax.enable_x64(True):
        ref_state, ref_metrics = _steps(tx, views(16), 3, jax.random.key(0), float64=True)
        st, metrics = _steps(tx, views(16), 3, jax.random.key(0), mesh, float64=True)
        assert jax.tree.leaves(st.params)[0].dtype == jnp.float64
    for m, r in zip(metrics, ref_metrics):
        for name in r:
            np.testing.assert_allclose(m[name], r[name], rtol=1e-12, err_msg=name)
    assert int(st.step) == 3
    for a, b in ((st.params, ref_state.params), (st.batch_stats, ref_state.batch_stats),
                 (st.opt_state, ref_state.opt_state)):
        assert_leaves_close(a, b, rtol=1e-12)


def test_three_global_bn_steps_on_8_devices_equal_one_device(mesh):
    """The same in float32, as trained. The two differ by summation order only, so they agree
    to float32 rounding, amplified a little by 3 steps. Measured (2-core x86-64, jax 0.10.2):
    each run is within 3e-7 (parameters' relative norm) and 3e-6 (worst element) of the float64
    result, at the default XLA:CPU optimisation level, at level 0 and single-threaded, and so
    is the single-device run on a permuted batch (the same sum in another order). The two
    float32 runs differ by up to 3e-6 in a metric, and in one momentum leaf (of a BatchNorm
    scale: a sum whose terms cancel) by 2.1e-5 of that leaf, so the momenta are compared
    against their tree's norm. Tolerances: about 10x the differences seen."""
    tx = lars()
    key = jax.random.key(0)
    ref_state, ref_metrics = _steps(tx, views(16), 3, key)
    st, metrics = _steps(tx, views(16), 3, key, mesh)
    for m, r in zip(metrics, ref_metrics):
        for name in r:
            np.testing.assert_allclose(m[name], r[name], rtol=2e-5, err_msg=name)
    assert int(st.step) == 3
    assert_leaves_close(st.params, ref_state.params, rtol=2e-5)
    assert_leaves_close(st.batch_stats, ref_state.batch_stats, rtol=2e-5)
    assert_leaves_close(st.opt_state, ref_state.opt_state, rtol=2e-5, scale="tree")


def test_per_device_bn_equals_grouped_reference(mesh):
    # With per-device BN every device normalises its own 2b views. Reference: one device, the
    # model vmapped over the 8 groups (each group = one device's [x1_local; x2_local]).
    tx = lars()
    x1, x2 = views(32, seed=3)
    key = jax.random.key(0)
    mode = parallel.BN_MODES["local"]
    model = tiny_model(bn_axis_name=mode.model_axis_name)
    apply_fn = models.flax_apply_fn(model)
    st0 = tiny_state(tx)

    def reference_step(st):
        g1, g2 = x1.reshape(8, 4, *x1.shape[1:]), x2.reshape(8, 4, *x2.shape[1:])

        def loss_fn(params):
            group = lambda a, b: apply_fn(params, st.batch_stats, jnp.concatenate([a, b]), train=True)
            out, new_bs = jax.vmap(group)(g1, g2)
            z = out["projection"]  # [8, 8, D]
            z1, z2 = z[:, :4].reshape(32, -1), z[:, 4:].reshape(32, -1)
            return losses.info_nce(z1, z2, temperature=0.2), jax.tree.map(lambda s: s.mean(0), new_bs)

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
        updates, _ = tx.update(grads, st.opt_state, st.params)
        import optax
        return loss, optax.apply_updates(st.params, updates), new_bs

    ref_loss, ref_params, ref_bs = jax.jit(reference_step)(st0)

    step = parallel.compile_step(
        functools.partial(steps.simclr_step, apply_fn=apply_fn, tx=tx, temperature=0.2,
                          average_batch_stats=mode.average_batch_stats),
        mesh,
        donate_state=False,  # st0 is used again below
    )
    st, m = step(jax.device_put(st0, parallel.replicated(mesh)), (x1, x2), key)
    np.testing.assert_allclose(m["train/loss"], ref_loss, rtol=1e-5)
    assert_trees_close(st.params, ref_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(st.batch_stats, ref_bs, rtol=1e-5, atol=1e-6)
    # And it differs from global BN, so the mode really changes something.
    gmodel = tiny_model(bn_axis_name=parallel.DATA_AXIS)
    gstep = parallel.compile_step(
        functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(gmodel), tx=tx,
                          temperature=0.2), mesh, donate_state=False)
    _, gm = gstep(jax.device_put(st0, parallel.replicated(mesh)), (x1, x2), key)
    assert abs(float(gm["train/loss"]) - float(ref_loss)) > 1e-4


def test_global_batch_not_divisible_is_a_clear_error(mesh):
    with pytest.raises(ValueError, match=r"global batch size \(12\).*number of devices \(8\)"):
        parallel.host_to_global(views(12), mesh)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        parallel.check_global_batch(0, mesh)
    parallel.check_global_batch(16, mesh)


def test_compiled_step_donates_state(mesh):
    tx = lars()
    model = tiny_model(bn_axis_name=parallel.DATA_AXIS)
    step = parallel.compile_step(
        functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx,
                          temperature=0.2), mesh)
    st = jax.device_put(tiny_state(tx), parallel.replicated(mesh))
    leaf = jax.tree.leaves(st.params)[0]
    new_state, _ = step(st, views(8), jax.random.key(0))
    assert leaf.is_deleted(), "the old state's buffers should have been donated"
    assert not jax.tree.leaves(new_state.params)[0].is_deleted()
