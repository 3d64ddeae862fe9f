"""info_nce_blockwise: the values, accuracy and gradients of info_nce without the full logits."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import configuration, losses, optim, parallel, state, steps
from jaxssl.configuration import ConfigError
from reference import nt_xent
from tiny import assert_trees_close


def _embeddings(n, d, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(n, d)), jnp.float32))


def _nt_xent_grads(z1, z2, temperature):
    """Float64 numpy gradients of NT-Xent (reference.nt_xent) w.r.t. z1, z2 and the temperature.

    With S = C / T the masked cosine logits: dL/dS = (softmax(S) - onehot(positive)) / 2N, zero
    on the diagonal; C = q q^T gives dL/dq = (G + G^T) q / T, and q = z / |z| projects that onto
    the tangent of the sphere, divided by |z|.
    """
    z = np.concatenate([z1, z2]).astype(np.float64)
    n2 = z.shape[0]
    r = np.linalg.norm(z, axis=1, keepdims=True)
    q = z / r
    c = q @ q.T
    s = c / temperature
    np.fill_diagonal(s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    positive = np.concatenate([np.arange(n2 // 2, n2), np.arange(n2 // 2)])
    g = p.copy()
    g[np.arange(n2), positive] -= 1.0
    g /= n2
    dq = (g + g.T) @ q / temperature
    dz = (dq - q * np.sum(q * dq, axis=1, keepdims=True)) / r
    dt = -np.sum(g * c) / temperature ** 2
    return dz[: n2 // 2], dz[n2 // 2:], dt


def _blockwise_value_and_grads(z1, z2, temperature, *, block, axis_name=None):
    """((loss, accuracy), (dz1, dz2, dtemperature)) of info_nce_blockwise_with_accuracy."""
    def f(z1, z2, t):
        return losses.info_nce_blockwise_with_accuracy(z1, z2, temperature=t,
                                                       axis_name=axis_name, block_size=block)
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(z1, z2, temperature)


# One jitted function, so tests of the same shapes share a compilation (the temperature is
# traced for the same reason, and so that its gradient is checked).
_jit_blockwise = jax.jit(_blockwise_value_and_grads, static_argnames=("block", "axis_name"))


def _assert_matches_float64(loss, acc, grads, z1, z2, temperature, rtol=1e-5):
    ref_loss, ref_acc = nt_xent(np.asarray(z1), np.asarray(z2), temperature)
    ref_grads = _nt_xent_grads(np.asarray(z1), np.asarray(z2), temperature)
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)  # float32 of a count / 2N
    scale = max(np.abs(g).max() for g in ref_grads[:2])
    for g, r in zip(grads[:2], ref_grads[:2]):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-6 * scale)
    np.testing.assert_allclose(grads[2], ref_grads[2], rtol=rtol, atol=1e-6 * abs(ref_grads[2]))


# (n images, dim, temperature, block_size); 2n rows, 2n columns. Blocks of one row/column, that
# do not divide 2n (padded last tile of rows and of columns), of more than 2n (one tile). The
# (24, 8, 0.1, 5) case is also the one-device side of the sharded test.
CASES = [(1, 3, 0.5, 1), (5, 6, 0.3, 4), (6, 8, 0.07, 100), (24, 8, 0.1, 5)]


@pytest.mark.parametrize("n,d,temperature,block", CASES)
def test_values_accuracy_and_gradients_match_float64_numpy(n, d, temperature, block):
    z1, z2 = _embeddings(n, d, seed=n)
    (loss, acc), grads = _jit_blockwise(z1, z2, jnp.float32(temperature), block=block)
    assert loss.dtype == jnp.float32 and loss.shape == () and acc.shape == ()
    _assert_matches_float64(loss, acc, grads, z1, z2, temperature)


def test_equals_info_nce():
    z1, z2 = _embeddings(13, 16, seed=3)

    @jax.jit
    def both(z1, z2, t):
        plain = jax.value_and_grad(
            lambda a, b, t: losses.info_nce_with_accuracy(a, b, temperature=t),
            argnums=(0, 1, 2), has_aux=True)(z1, z2, t)
        return (plain, _blockwise_value_and_grads(z1, z2, t, block=6),  # 2N = 26
                losses.info_nce_blockwise(z1, z2, temperature=t, block_size=6))

    ((ref_loss, ref_acc), ref_grads), ((loss, acc), grads), bare = both(z1, z2, jnp.float32(0.2))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert float(bare) == float(loss)
    assert float(acc) == float(ref_acc)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("block", [1, 5])
def test_ties_go_to_the_first_column_as_argmax(block):
    # One-hot embeddings shared by several images: every logit is exactly 0 or 1/T, so rows tie
    # between their positive and the earlier columns of other images with the same one-hot
    # (T a power of two keeps 1/T exact). jnp.argmax (and numpy's) picks the first.
    hot = np.eye(4, dtype=np.float32)
    z1 = hot[[0, 1, 2, 3, 0, 1]]
    z2 = hot[[0, 1, 2, 3, 0, 3]]
    loss, acc = losses.info_nce_blockwise_with_accuracy(z1, z2, temperature=0.5, block_size=block)
    ref_loss, ref_acc = losses.info_nce_with_accuracy(z1, z2, temperature=0.5)
    np_loss, np_acc = nt_xent(z1, z2, 0.5)
    assert 0 < np_acc < 1  # some rows lose their tie, some win it
    assert float(acc) == float(ref_acc)
    np.testing.assert_allclose(acc, np_acc, rtol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)


@pytest.mark.parametrize("block", [0, -3, 2.0, True, None])
def test_bad_block_size_raises(block):
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        losses.info_nce_blockwise(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.1,
                                  block_size=block)


def test_inputs_are_checked_as_info_nce_checks_them():
    with pytest.raises(ValueError, match="same shape"):
        losses.info_nce_blockwise(jnp.ones((4, 8)), jnp.ones((5, 8)), temperature=0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.info_nce_blockwise(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)


def _largest_array(hlo_text: str) -> int:
    """Elements of the largest array of any type in an HLO module's text."""
    sizes = [int(np.prod([int(x) for x in dims.split(",") if x], dtype=np.int64))
             for dims in re.findall(r"\b(?:pred|[sfu]\d+|bf16)\[([\d,]*)\]", hlo_text)]
    return max(sizes)


def test_compiled_forward_and_backward_hold_no_full_logits():
    # 2N = 256 views: the full logits are 256 x 256; with tiles of 16 the largest array of the
    # compiled value-and-gradient is an input-sized [256, 8], whatever XLA fuses.
    n, d, block = 128, 8, 16
    z = jnp.ones((2, n, d), jnp.float32)

    def compiled(loss_fn):
        return jax.jit(jax.value_and_grad(lambda z: loss_fn(z[0], z[1]))).lower(z).compile()

    plain = compiled(functools.partial(losses.info_nce, temperature=0.1))
    tiled = compiled(functools.partial(losses.info_nce_blockwise, temperature=0.1,
                                       block_size=block))
    full = (2 * n) ** 2
    assert _largest_array(plain.as_text()) >= full  # the check does see a full matrix
    assert _largest_array(tiled.as_text()) <= 2 * n * d < full // 4
    # XLA's own figure for the scratch memory, where the backend gives one: a quarter of one
    # float32 full matrix (plain: about three of them).
    plain_mem, tiled_mem = plain.memory_analysis(), tiled.memory_analysis()
    if plain_mem is not None and tiled_mem is not None:
        assert plain_mem.temp_size_in_bytes >= 4 * full
        assert tiled_mem.temp_size_in_bytes < 4 * full // 2


def test_sharded_on_8_devices_equals_one_device():
    # 3 images per device: 6 local rows in tiles of 5 (padded) against 48 gathered columns.
    assert jax.device_count() == 8, "conftest.py must give 8 fake CPU devices"
    mesh = parallel.make_mesh()
    n, dim, temperature, block = 24, 8, 0.1, 5
    z1, z2 = _embeddings(n, dim, seed=n)
    t = jnp.float32(temperature)
    sharded = jax.jit(jax.shard_map(
        functools.partial(_blockwise_value_and_grads, block=block, axis_name=parallel.DATA_AXIS),
        mesh=mesh, in_specs=(P("data"), P("data"), P()),
        out_specs=((P(), P()), (P("data"), P("data"), P()))))
    (loss, acc), grads = sharded(z1, z2, t)
    _assert_matches_float64(loss, acc, grads, z1, z2, temperature)
    (one_loss, one_acc), one_grads = _jit_blockwise(z1, z2, t, block=block)
    np.testing.assert_allclose(loss, one_loss, rtol=1e-6)
    assert float(acc) == float(one_acc)
    for g, r in zip(grads, one_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))


def _mlp_apply(params, batch_stats, images, *, train):
    """A two-layer MLP with the documented apply_fn signature: quick to compile."""
    x = images.reshape(images.shape[0], -1)
    return {"projection": jnp.tanh(x @ params["w1"]) @ params["w2"]}, batch_stats


def test_simclr_step_with_the_blockwise_loss_equals_the_plain_step():
    rng = np.random.default_rng(5)
    params = {"w1": jnp.asarray(rng.normal(size=(48, 16)) / 7, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(16, 8)) / 4, jnp.float32)}
    tx = optim.make_optimizer("sgd", 0.1, momentum=0.9)
    x1, x2 = (rng.normal(size=(12, 4, 4, 3)).astype(np.float32) for _ in range(2))

    def one_step(**kw):
        step = jax.jit(functools.partial(steps.simclr_step, apply_fn=_mlp_apply, tx=tx,
                                         temperature=0.2, **kw))
        return step(state.create_train_state(params, {}, tx), (x1, x2), jax.random.key(0))

    plain_state, plain_metrics = one_step()
    tiled_state, tiled_metrics = one_step(loss_block_size=5)  # 2N = 24: padded tiles
    assert set(tiled_metrics) == set(plain_metrics)
    for name, value in plain_metrics.items():
        np.testing.assert_allclose(tiled_metrics[name], value, rtol=1e-5, err_msg=name)
    assert int(tiled_state.step) == 1
    assert_trees_close(tiled_state.params, plain_state.params, rtol=1e-5, atol=1e-7)
    assert_trees_close(tiled_state.opt_state, plain_state.opt_state, rtol=1e-5, atol=1e-7)
    assert not np.allclose(tiled_state.params["w1"], params["w1"])  # the step did move them


def test_config_field_and_its_validation():
    c = configuration.load_config("demo")
    assert c.loss.block_size == 0  # the plain loss unless asked
    configuration.apply_overrides(c, [("loss.block_size", "4096")])
    configuration.validate(c)
    configuration.apply_overrides(c, [("loss.block_size", "-1")])
    with pytest.raises(ConfigError) as e:
        configuration.validate(c)
    assert "loss.block_size must be >= 0" in str(e.value) and "\n" not in str(e.value)

