"""MoCo's pieces against hand-computed values and a float64 numpy reference: EMA, momentum
schedules, the queue's ring buffer, the queue InfoNCE (and that keys get no gradient)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxssl import ema, losses, parallel, queue


def test_ema_update_by_hand():
    target = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0, jnp.bfloat16)}
    online = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(0.0, jnp.bfloat16)}
    out = ema.ema_update(target, online, 0.75)
    np.testing.assert_allclose(out["w"], [0.75 * 1 + 0.25 * 3, 0.75 * 2], rtol=0)
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"]) == 3.0
    np.testing.assert_array_equal(ema.ema_update(target, online, 1.0)["w"], target["w"])
    np.testing.assert_array_equal(ema.ema_update(target, online, 0.0)["w"], online["w"])
    traced = jax.jit(ema.ema_update)(target, online, jnp.float32(0.5))
    np.testing.assert_allclose(traced["w"], [2.0, 1.0])


def test_momentum_schedules_by_hand():
    const = ema.constant_momentum(0.99)
    assert float(const(0)) == pytest.approx(0.99) and float(const(10**6)) == pytest.approx(0.99)
    cos = ema.cosine_momentum(0.996, 100)
    assert float(cos(0)) == pytest.approx(0.996)
    assert float(cos(50)) == pytest.approx(1 - 0.004 * 0.5)
    assert float(cos(25)) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert float(cos(100)) == pytest.approx(1.0) and float(cos(500)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_momentum_outside_0_1_is_an_error(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        ema.constant_momentum(bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        ema.ema_update({"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}, bad)


def test_queue_ring_buffer_order_with_wrap_around():
    q = queue.init_queue(jax.random.key(0), 6, 2)
    np.testing.assert_allclose(np.linalg.norm(q.keys, axis=1), 1.0, rtol=1e-6)
    assert int(q.ptr) == 0
    batches = [np.array([[1.0, 0.0], [0.0, 1.0]]) * (i + 1) for i in range(4)]
    step = jax.jit(queue.enqueue)
    for i, b in enumerate(batches):
        q = step(q, jnp.asarray(b, jnp.float32))
        assert int(q.ptr) == (2 * (i + 1)) % 6
    # Four batches of 2 into 6 rows: rows 0-1 hold batch 4 (wrapped), 2-3 batch 2, 4-5 batch 3;
    # rows are stored normalised.
    want = np.array([[1, 0], [0, 1]] * 3, np.float32)
    np.testing.assert_array_equal(np.asarray(q.keys), want)
    marked = queue.enqueue(q, jnp.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(marked.keys[2:4], [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(marked.keys[:2], q.keys[:2])


def test_queue_size_must_be_a_multiple_of_the_keys_per_step():
    queue.check_queue_size(4096, 512)
    with pytest.raises(ValueError, match=r"queue size K \(4000\) must be a positive multiple .*512.*K=3584"):
        queue.check_queue_size(4000, 512)
    with pytest.raises(ValueError, match="multiple of the 4 keys"):
        queue.enqueue(queue.init_queue(jax.random.key(0), 6, 2), jnp.ones((4, 2)))


def _reference_moco(q, k, negatives, t):
    q, k, negatives = (np.asarray(x, np.float64) for x in (q, k, negatives))
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    negatives = negatives / np.linalg.norm(negatives, axis=1, keepdims=True)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ negatives.T], axis=1) / t
    m = logits.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return np.mean(log_z - logits[:, 0]), np.mean(np.argmax(logits, 1) == 0)


def _data(b=12, d=8, k=20, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d)).astype(np.float32)
    keys = (q + 0.5 * rng.normal(size=(b, d))).astype(np.float32)  # positives resemble queries
    return q, keys, rng.normal(size=(k, d)).astype(np.float32)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_moco_info_nce_matches_float64_reference(t):
    q, k, neg = _data()
    loss, acc = losses.moco_info_nce_with_accuracy(q, k, neg, temperature=t)
    ref_loss, ref_acc = _reference_moco(q, k, neg, t)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(acc) == pytest.approx(ref_acc)


def test_no_gradient_reaches_keys_or_queue():
    q, k, neg = _data()
    grads = jax.grad(lambda q, k, n: losses.moco_info_nce(q, k, n, temperature=0.2),
                     argnums=(0, 1, 2))(q, k, neg)
    assert np.abs(np.asarray(grads[0])).max() > 0
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_moco_info_nce_sharded_equals_one_device():
    q, k, neg = _data(b=16)
    mesh = parallel.make_mesh()
    fn = jax.jit(jax.shard_map(
        functools.partial(losses.moco_info_nce_with_accuracy, temperature=0.1,
                          axis_name=parallel.DATA_AXIS),
        mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P()), out_specs=P()))
    loss, acc = fn(q, k, neg)
    want_loss, want_acc = losses.moco_info_nce_with_accuracy(q, k, neg, temperature=0.1)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert float(acc) == pytest.approx(float(want_acc))


def test_moco_info_nce_bad_shapes():
    q, k, neg = _data()
    with pytest.raises(ValueError, match="queue \\[K, dim\\]"):
        losses.moco_info_nce(q, k, neg[:, :4], temperature=0.2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.moco_info_nce(q, k, neg, temperature=0.0)
