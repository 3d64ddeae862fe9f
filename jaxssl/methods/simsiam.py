"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no momentum encoder and no
negatives. No fields of its own; the predictor's widths are `model.predictor_hidden_dims`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxssl.losses import simsiam_loss
from jaxssl.methods import base

__all__ = ["simsiam_step", "METHOD"]


def simsiam_step(state, batch: Any, key: jax.Array, *, apply_fn: Callable,
                 tx: optax.GradientTransformation, axis_name: str | None = None,
                 average_batch_stats: bool = False, augment_fn: Callable | None = None,
                 probe_tx: optax.GradientTransformation | None = None):
    """One SimSiam update: loss = (D(p1, z2) + D(p2, z1)) / 2 with D = `simsiam_loss`
    (-cos, no gradient into z); p the predictions, z the projections of the same network.
    apply_fn's outputs need "prediction". Other arguments as for `jaxssl.steps.simclr_step`.
    Returns (state, metrics): "train/loss" (-1 at the optimum), "train/grad_norm" (and the
    probe's)."""
    def loss_fn(online, _):
        p1, p2 = online[0]["prediction"], online[1]["prediction"]
        z1, z2 = online[0]["projection"], online[1]["projection"]
        loss = 0.5 * (simsiam_loss(p1, z2, axis_name=axis_name)
                      + simsiam_loss(p2, z1, axis_name=axis_name))
        return loss, {}

    return base.two_view_step(state, batch, key, loss_fn=loss_fn, apply_fn=apply_fn, tx=tx,
                              axis_name=axis_name, average_batch_stats=average_batch_stats,
                              augment_fn=augment_fn, probe_tx=probe_tx)


METHOD = base.Method(name="simsiam", title="SimSiam", step=simsiam_step,
                     bind=lambda exp: base.bound(simsiam_step, exp), predictor=True)
