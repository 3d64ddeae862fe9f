"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' standardised
embeddings pushed to the identity, over the global batch. Fields under `barlow_twins`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxssl.losses import barlow_twins_loss
from jaxssl.methods import base

__all__ = ["barlow_twins_step", "METHOD"]


def barlow_twins_step(state, batch: Any, key: jax.Array, *, apply_fn: Callable,
                      tx: optax.GradientTransformation, lambd: float = 0.0051,
                      scale_loss: float = 1.0, axis_name: str | None = None,
                      average_batch_stats: bool = False, augment_fn: Callable | None = None,
                      probe_tx: optax.GradientTransformation | None = None):
    """One Barlow Twins update: loss = scale_loss * `barlow_twins_loss`(z1, z2, lambd), its
    standardisation and cross-correlation over the global batch (axis_name). Other arguments as
    for `jaxssl.steps.simclr_step`. Returns (state, metrics): "train/loss", "train/grad_norm"
    (and the probe's)."""
    def loss_fn(online, _):
        return scale_loss * barlow_twins_loss(online[0]["projection"], online[1]["projection"],
                                              lambd=lambd, axis_name=axis_name), {}

    return base.two_view_step(state, batch, key, loss_fn=loss_fn, apply_fn=apply_fn, tx=tx,
                              axis_name=axis_name, average_batch_stats=average_batch_stats,
                              augment_fn=augment_fn, probe_tx=probe_tx)


def config_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.lambd = 0.0051  # the weight of the off-diagonal terms
    g.scale_loss = 1.0  # the whole loss times this (solo-learn's CIFAR recipe: 0.1)
    return g


def validate(config) -> None:
    from jaxssl.configuration import _check

    g = config.barlow_twins
    _check(g.lambd >= 0, f"barlow_twins.lambd must be >= 0 (the paper: 0.0051); got {g.lambd}")
    _check(g.scale_loss > 0, f"barlow_twins.scale_loss must be positive; got {g.scale_loss}")


METHOD = base.Method(
    name="barlow_twins", title="Barlow Twins", step=barlow_twins_step,
    bind=lambda exp: base.bound(barlow_twins_step, exp, lambd=exp.config.barlow_twins.lambd,
                                scale_loss=exp.config.barlow_twins.scale_loss),
    config_group=config_group, validate=validate)
