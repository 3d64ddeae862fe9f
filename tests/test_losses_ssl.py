"""BYOL, SimSiam, Barlow Twins, VICReg and MoCo v3 losses: values and gradients against float64
numpy (tests/reference.py), and sharded on 8 fake devices against one device."""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import reference
from jaxssl import losses, parallel

N, DIM = 16, 6  # 2 rows on each of the 8 devices


class Case(NamedTuple):
    loss: Callable  # (*arrays, axis_name) -> scalar
    reference: Callable  # (*float64 arrays) -> float64 scalar
    trained: tuple  # per input: whether the gradient reaches it (False: stop-gradient, zero)


CASES = {
    "byol": Case(losses.byol_loss, reference.byol, (True, False)),
    "simsiam": Case(losses.simsiam_loss, reference.simsiam, (True, False)),
    "barlow_twins": Case(functools.partial(losses.barlow_twins_loss, lambd=0.02),
                         lambda z1, z2: reference.barlow_twins(z1, z2, 0.02), (True, True)),
    "vicreg": Case(losses.vicreg_loss, lambda z1, z2: reference.vicreg(z1, z2)[0], (True, True)),
    "mocov3": Case(functools.partial(losses.mocov3_loss, temperature=0.3),
                   lambda *a: reference.mocov3(*a, 0.3)[0], (True, True, False, False)),
}
NAMES = list(CASES)


def _inputs(name, dtype=np.float32, n=N, seed=0):
    """The loss's inputs: [n, DIM] each, the second view near the first; the columns on
    different scales (from 0.3 to 2), so some of VICReg's std hinges are active and some not."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.3, 2.0, DIM)
    x = rng.normal(size=(n, DIM)) * scale
    arrays = [x, x + 0.7 * rng.normal(size=(n, DIM)) * scale]
    if len(CASES[name].trained) == 4:  # MoCo v3: keys near their queries
        arrays += [a + 0.5 * rng.normal(size=(n, DIM)) for a in arrays]
    return tuple(np.asarray(a, dtype) for a in arrays)


def _value_and_grads(name, *arrays, axis_name=None):
    """(loss, gradients w.r.t. every input) of CASES[name]."""
    def loss(*arrays):
        return CASES[name].loss(*arrays, axis_name=axis_name)
    return jax.value_and_grad(loss, argnums=tuple(range(len(arrays))))(*arrays)


# Compiled once per loss and dtype, shared by the tests.
_one_device = jax.jit(_value_and_grads, static_argnums=0)


@functools.cache
def _sharded(name):
    spec = (P(parallel.DATA_AXIS),) * len(CASES[name].trained)
    return jax.jit(jax.shard_map(
        functools.partial(_value_and_grads, name, axis_name=parallel.DATA_AXIS),
        mesh=parallel.make_mesh(), in_specs=spec, out_specs=(P(), spec)))


def _reference_grads(name, arrays):
    """Central finite differences of the float64 reference w.r.t. each trained input (step
    1e-5: measured, they are within 5e-10 of the gradients' scale, better than at 1e-6 or 1e-4,
    where rounding or the step's error dominates)."""
    ref = CASES[name].reference
    grads = []
    for i, trained in enumerate(CASES[name].trained):
        if trained:
            def f(x, i=i):
                return ref(*arrays[:i], x, *arrays[i + 1:])
            grads.append(reference.numerical_grad(f, arrays[i], eps=1e-5))
        else:
            grads.append(None)
    return grads


def _assert_close(value, grads, ref_value, ref_grads, rtol):
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    scale = max(np.abs(r).max() for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", NAMES)
def test_value_and_gradients_match_float64_numpy(name):
    with jax.enable_x64(True):
        arrays = _inputs(name, np.float64)
        value, grads = _one_device(name, *arrays)
        assert value.dtype == jnp.float64 and value.shape == ()
    np.testing.assert_allclose(value, CASES[name].reference(*arrays), rtol=1e-13)
    ref_grads = _reference_grads(name, arrays)
    scale = max(np.abs(r).max() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        if r is None:  # stop-gradient input: exactly nothing reaches it
            assert not np.any(np.asarray(g))
        else:
            np.testing.assert_allclose(g, r, rtol=1e-7, atol=5e-9 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_on_8_devices_equals_one_device_in_float64(name):
    """The sharded loss is the single-device loss of the whole batch: in float64, where rounding
    is 1e-16, they agree to 1e-12. A statistic left per-device (a missing psum) would differ at
    1e-2 or more: see test_a_per_device_statistic_would_be_seen."""
    assert jax.device_count() == 8, "conftest.py must give 8 fake CPU devices"
    with jax.enable_x64(True):
        arrays = _inputs(name, np.float64)
        value, grads = _sharded(name)(*arrays)
        ref_value, ref_grads = _one_device(name, *arrays)
    assert grads[0].dtype == jnp.float64
    _assert_close(value, grads, ref_value, ref_grads, rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_on_8_devices_equals_one_device_in_float32(name):
    """The same in float32: the two differ only in the order of the sums. Measured (2-core
    x86-64, jax 0.10.2): values within 8.4e-8 relative, gradients within 2.7e-7 of their largest
    element (Barlow Twins; BYOL and SimSiam agree exactly), and each within 1.8e-7 (values) and
    7e-7 (gradients) of float64. Tolerances: about 10x that."""
    arrays = _inputs(name)
    value, grads = _sharded(name)(*arrays)
    ref_value, ref_grads = _one_device(name, *arrays)
    assert value.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    _assert_close(value, grads, ref_value, ref_grads, rtol=3e-6)
    np.testing.assert_allclose(value, CASES[name].reference(*arrays), rtol=2e-6)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "mocov3"])
def test_a_per_device_statistic_would_be_seen(name):
    # The mean over the 8 shards of each shard's own loss (statistics, or negatives, of its 2
    # rows alone) is far from the global loss, so the 1e-12 comparison above would catch a
    # statistic that is not reduced over devices.
    arrays = _inputs(name, np.float64)
    ref = CASES[name].reference
    per_device = np.mean([ref(*(a[2 * d: 2 * d + 2] for a in arrays)) for d in range(8)])
    assert abs(per_device - ref(*arrays)) > 1e-2 * abs(ref(*arrays))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_are_computed_in_float32(name):
    arrays = tuple(jnp.asarray(a, jnp.bfloat16) for a in _inputs(name))
    value, grads = _one_device(name, *arrays)
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)  # gradients take their input's dtype
    # The float64 reference on the bfloat16-rounded values: nothing else is rounded to bf16.
    np.testing.assert_allclose(value, CASES[name].reference(*(np.asarray(a, np.float64)
                                                               for a in arrays)), rtol=1e-5)


def _dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr and of the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dot_generals(sub)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "mocov3"])
def test_every_product_is_float32_at_highest_precision(name):
    # On GPUs and TPUs the default precision rounds products' inputs to TF32 or bfloat16; CPU
    # does not, so the forward and backward jaxprs (sharded, from bfloat16 inputs) are checked.
    arrays = tuple(jnp.asarray(a, jnp.bfloat16) for a in _inputs(name))
    jaxpr = jax.make_jaxpr(_sharded(name))(*arrays).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert len(dots) >= 2  # forward and backward
    for eqn in dots:
        assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, eqn
        assert all(v.aval.dtype == jnp.float32 for v in eqn.invars), eqn


def test_byol_and_simsiam_hand_computed():
    p = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], np.float32)
    # The same directions: cos = 1; the opposite: cos = -1; orthogonal: cos = 0.
    np.testing.assert_allclose(losses.byol_loss(p, 3.0 * p), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.simsiam_loss(p, 3.0 * p), -1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.byol_loss(p, -p), 4.0, rtol=1e-6)
    np.testing.assert_allclose(losses.simsiam_loss(p, -p), 1.0, rtol=1e-6)
    orthogonal = np.array([[2.0, -1.0, 5.0], [1.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(losses.byol_loss(p, orthogonal), 2.0, rtol=1e-6)
    np.testing.assert_allclose(losses.simsiam_loss(p, orthogonal), 0.0, atol=1e-7)


def test_barlow_twins_hand_computed():
    # Columns of mean 0, biased variance 1 and orthogonal: standardised, z1 = z2 has c = I up to
    # the 1e-5 in the standardisation: c_ii = 1 / (1 + 1e-5), c_ij = 0.
    z = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
    expected = 2 * (1 - 1 / (1 + 1e-5)) ** 2  # 2e-10
    with jax.enable_x64(True):
        np.testing.assert_allclose(losses.barlow_twins_loss(np.float64(z), np.float64(z)),
                                   expected, rtol=1e-9)
    # In float32, c_ii is 1 - 1e-5 to within 6e-8: the loss is 2e-10 to within 1e-11.
    np.testing.assert_allclose(losses.barlow_twins_loss(z, z), expected, atol=1e-11)
    # A shift does not matter, a scale only through the 1e-5 (z2's variance is 25).
    scaled = 2 * (1 - 1 / np.sqrt((1 + 1e-5) * (1 + 1e-5 / 25))) ** 2
    np.testing.assert_allclose(losses.barlow_twins_loss(z, 5 * z + 3), scaled, atol=1e-11)
    # Swapping the columns of z2 makes c the swap matrix: each diagonal term is (1 - 0)^2 and
    # the off-diagonal ones lambd * 1.
    np.testing.assert_allclose(losses.barlow_twins_loss(z, z[:, ::-1], lambd=0.5),
                               2 + 0.5 * 2 / (1 + 1e-5) ** 2, rtol=1e-6)


def test_vicreg_hand_computed_and_terms():
    # Orthogonal centred columns with unbiased std sqrt(4/3) > 1, z1 = z2: every term is 0.
    z = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
    loss, terms = losses.vicreg_loss_with_terms(z, z)
    assert float(loss) == 0.0 and all(float(t) == 0.0 for t in terms.values())
    # Collapse to one point: std = sqrt(1e-4) = 0.01 in every dimension, hinge 0.99 per view.
    c = np.ones((4, 3), np.float32)
    loss, terms = losses.vicreg_loss_with_terms(c, c)
    np.testing.assert_allclose(terms["variance"], 0.99, rtol=1e-6)
    np.testing.assert_allclose(loss, 25 * 0.99, rtol=1e-6)
    # The terms and the coefficients against the reference.
    z1, z2 = _inputs("vicreg")
    loss, terms = losses.vicreg_loss_with_terms(z1, z2, sim_coeff=2.0, std_coeff=3.0,
                                                cov_coeff=0.5)
    ref_loss, ref_terms = reference.vicreg(z1, z2, 2.0, 3.0, 0.5)
    assert ref_terms[1] > 0.01  # the std hinge is active in this case
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for key, r in zip(("invariance", "variance", "covariance"), ref_terms):
        np.testing.assert_allclose(terms[key], r, rtol=1e-5, err_msg=key)
    assert float(losses.vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0,
                                    cov_coeff=0.5)) == float(loss)


def test_mocov3_hand_computed_and_accuracy():
    # Orthogonal one-hot keys and queries equal to them: the positive logit 1/T, the other N-1
    # zero: each ctr is 2T * -log(e^(1/T) / (e^(1/T) + N - 1)), the accuracy 1.
    k = np.eye(4, dtype=np.float32)
    t = 0.5
    loss, acc = losses.mocov3_loss_with_accuracy(2 * k, k, k, 3 * k, temperature=t)
    ctr = 2 * t * -np.log(np.exp(1 / t) / (np.exp(1 / t) + 3))
    np.testing.assert_allclose(loss, 2 * ctr, rtol=1e-6)
    assert float(acc) == 1.0
    arrays = _inputs("mocov3")
    ref_loss, ref_acc = reference.mocov3(*arrays, 0.3)
    loss, acc = jax.jit(jax.shard_map(
        functools.partial(losses.mocov3_loss_with_accuracy, temperature=0.3,
                          axis_name=parallel.DATA_AXIS),
        mesh=parallel.make_mesh(), in_specs=(P(parallel.DATA_AXIS),) * 4,
        out_specs=(P(), P())))(*arrays)
    assert 0 < ref_acc < 1
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise(name):
    k = len(CASES[name].trained)
    with pytest.raises(ValueError, match=r"of one shape \[batch, dim\]"):
        CASES[name].loss(*([jnp.ones((4, 3))] * (k - 1) + [jnp.ones((4, 2))]))
    with pytest.raises(ValueError, match=r"of one shape \[batch, dim\]"):
        CASES[name].loss(*([jnp.ones((4,))] * k))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.mocov3_loss(*([jnp.ones((2, 3))] * 4), temperature=0.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        losses.vicreg_loss(jnp.ones((1, 3)), jnp.ones((1, 3)))
