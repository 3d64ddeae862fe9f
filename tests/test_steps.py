import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import losses, models, optim, parallel, state, steps
from tiny import IMAGE, lars, tiny_model, tiny_state, views


def test_step_metrics_and_loss_goes_down():
    tx = optim.make_optimizer("sgd", 0.05, momentum=0.9)
    model = tiny_model()
    step = jax.jit(functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(model),
                                     tx=tx, temperature=0.5))
    st = tiny_state(tx)
    batch = views(16)
    history = []
    for _ in range(8):
        st, m = step(st, batch, jax.random.key(0))
        history.append(float(m["train/loss"]))
        assert set(m) == {"train/loss", "train/contrastive_top1", "train/grad_norm",
                      "train/alignment", "train/uniformity"}
        assert all(v.shape == () and v.dtype == jnp.float32 for v in m.values())
    assert int(st.step) == 8
    assert history[-1] < history[0] - 0.1, history
    # BN running statistics moved away from their initial values.
    assert not np.allclose(st.batch_stats["backbone"]["bn1"]["var"], 1.0)


def test_step_is_deterministic_bitwise():
    tx = lars()
    model = tiny_model()
    step = jax.jit(functools.partial(steps.simclr_step, apply_fn=models.flax_apply_fn(model),
                                     tx=tx, temperature=0.2))
    a, _ = step(tiny_state(tx), views(8), jax.random.key(0))
    b, _ = step(tiny_state(tx), views(8), jax.random.key(0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


class _Mlp(nn.Module):
    """Someone else's model: no BatchNorm, returns a bare array."""

    @nn.compact
    def __call__(self, x, train=True):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(6)(nn.tanh(nn.Dense(12)(x)))


def test_any_flax_model_and_plain_apply_fn():
    module = _Mlp()
    params, batch_stats = models.init_variables(module, jax.random.key(0), (1, 4, 4, 3))
    assert batch_stats == {}
    lr, t = 0.1, 0.3
    tx = optim.make_optimizer("sgd", lr, momentum=0.0)
    x1, x2 = (np.random.default_rng(s).normal(size=(5, 4, 4, 3)).astype(np.float32) for s in (1, 2))

    def expected_params():
        def loss(p):
            f = lambda x: module.apply({"params": p}, x)  # noqa: E731
            return losses.info_nce(f(x1), f(x2), temperature=t)
        g = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, g)

    st = state.create_train_state(params, batch_stats, tx)
    new, m = steps.simclr_step(st, (x1, x2), jax.random.key(0), apply_fn=models.flax_apply_fn(module),
                               tx=tx, temperature=t)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected_params())):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # A hand-written apply_fn (no Flax at all) with the documented signature.
    def linear_apply(p, bs, images, *, train):
        return {"projection": images.reshape(images.shape[0], -1) @ p["w"]}, bs

    w = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(48, 6)), jnp.float32)}
    st = state.create_train_state(w, {}, tx)
    new, m = steps.simclr_step(st, (x1, x2), jax.random.key(0), apply_fn=linear_apply, tx=tx,
                               temperature=t)
    g = jax.grad(lambda p: losses.info_nce(x1.reshape(5, -1) @ p["w"], x2.reshape(5, -1) @ p["w"],
                                           temperature=t))(w)
    np.testing.assert_allclose(new.params["w"], w["w"] - lr * g["w"], rtol=1e-6, atol=1e-7)


def test_augment_fn_gets_a_key_per_step():
    seen = []

    def augment(images, keys):
        noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
        return images + noise, images - noise

    def apply_fn(p, bs, images, *, train):
        return {"projection": images.reshape(images.shape[0], -1) * p["s"]}, bs

    tx = optim.make_optimizer("sgd", 0.0)
    st = state.create_train_state({"s": jnp.ones(())}, {}, tx)
    step = jax.jit(functools.partial(steps.simclr_step, apply_fn=apply_fn, tx=tx, temperature=0.5,
                                     augment_fn=augment))
    images = np.zeros((4, 2, 2, 3), np.float32)
    for _ in range(2):
        st, m = step(st, images, jax.random.key(7))
        seen.append(float(m["train/loss"]))
    assert seen[0] != seen[1], "a new step must draw new augmentations"
    st0 = state.create_train_state({"s": jnp.ones(())}, {}, tx)
    _, again = step(st0, images, jax.random.key(7))
    assert float(again["train/loss"]) == seen[0], "same step and key: same augmentations"


def test_example_keys_follow_global_position_not_device_count():
    mesh = parallel.make_mesh()

    def bits(step):
        keys = steps.example_keys(jax.random.key(3), step, 2, parallel.DATA_AXIS)
        return jax.vmap(lambda k: jax.random.bits(k, ()))(keys)

    sharded = jax.jit(jax.shard_map(bits, mesh=mesh, in_specs=P(), out_specs=P(parallel.DATA_AXIS)))
    b5 = np.asarray(sharded(jnp.int32(5)))  # 8 devices x 2 examples
    single = jax.vmap(lambda k: jax.random.bits(k, ()))(
        steps.example_keys(jax.random.key(3), jnp.int32(5), 16))
    np.testing.assert_array_equal(b5, np.asarray(single))
    assert len(set(b5.tolist())) == 16
    expected = [int(jax.random.bits(jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 5), i), ()))
                for i in range(16)]
    assert b5.tolist() == expected
    assert not set(np.asarray(sharded(jnp.int32(6))).tolist()) & set(b5.tolist())


def test_mismatched_views_raise():
    tx = lars()
    with pytest.raises(ValueError, match="two views must have the same shape"):
        steps.simclr_step(tiny_state(tx), (np.zeros((4, IMAGE, IMAGE, 3)), np.zeros((2, IMAGE, IMAGE, 3))),
                          jax.random.key(0), apply_fn=models.flax_apply_fn(tiny_model()), tx=tx,
                          temperature=0.1)
