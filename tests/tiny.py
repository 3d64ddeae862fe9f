"""Tiny models and batches shared by the step tests (seconds on a 2-core CPU)."""

import functools

import jax
import numpy as np

from jaxssl import models, optim, state

IMAGE = 16  # pixels per side


def tiny_model(bn_axis_name=None, **kw):
    # zero_init_last_bn (SimCLR's and Goyal et al.'s setting) keeps the first steps well
    # conditioned: without it, BatchNorm-bias gradients of this random tiny net are sums that
    # cancel almost exactly, and float32 rounding (even just permuting the batch on one device)
    # is amplified to 1e-2 relative differences within three steps.
    kw = {"cifar_stem": True, "width": 4, "head_hidden_dims": (16,), "out_dim": 8,
          "zero_init_last_bn": True, **kw}
    return models.create_model("resnet18", bn_axis_name=bn_axis_name, **kw)


def tiny_state(tx, seed=0, **kw):
    params, batch_stats = models.init_variables(tiny_model(**kw), jax.random.key(seed),
                                                (1, IMAGE, IMAGE, 3))
    return state.create_train_state(params, batch_stats, tx)


def views(batch, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, batch, IMAGE, IMAGE, 3)).astype(np.float32)
    return x[0], x[1]


def lars(lr=0.1, weight_decay=1e-4):
    return optim.make_optimizer("lars", lr, weight_decay=weight_decay)


def copy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b, rtol, atol=0.0):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_leaves_close(a, b, rtol, scale="leaf"):
    """Each leaf of a within rtol of b's in the L2 norm: ||a - b|| <= rtol * ||b||, where ||b||
    is the leaf's norm (scale="leaf") or the whole tree's (scale="tree"). The norm-wise form of
    a float32 comparison: an element near zero carries the rounding of the large terms it was
    summed from, so element-wise relative tolerances fail on it for no fault of the
    computation. Gradient-like trees (optimizer momenta) use scale="tree": a leaf whose terms
    cancel is small, yet its rounding error is set by the size of those terms."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    total = np.sqrt(sum(np.sum(np.square(np.asarray(y, np.float64))) for y in lb))
    for path, x, y in zip(jax.tree_util.tree_flatten_with_path(b)[0], la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err, ref = np.linalg.norm(x - y), (np.linalg.norm(y) if scale == "leaf" else total)
        assert err <= rtol * ref, (
            f"{jax.tree_util.keystr(path[0])}: |a - b| / |b| = {err / ref if ref else err:.3g} "
            f"> {rtol:g} ({scale} norm)")


def as_float64(state, tx):
    """A TrainState in float64 (params, BatchNorm statistics, a fresh optimizer state): run
    inside `jax.enable_x64(True)` with a model built with dtype=jnp.float64."""
    import jax.numpy as jnp

    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    params = cast(state.params)
    return state.replace(params=params, batch_stats=cast(state.batch_stats),
                         opt_state=tx.init(params))


partial = functools.partial
