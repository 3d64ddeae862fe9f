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


partial = functools.partial
