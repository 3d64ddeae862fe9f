"""BYOL (Grill et al. 2020): an online network with a predictor regresses the projections of
an EMA target network, symmetrically over the two views; no negatives. Fields under `byol`;
the predictor's widths are `model.predictor_hidden_dims`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxssl.losses import byol_loss
from jaxssl.methods import base

__all__ = ["byol_step", "METHOD"]


def byol_step(state, batch: Any, key: jax.Array, *, apply_fn: Callable,
              tx: optax.GradientTransformation, momentum_fn: Callable,
              axis_name: str | None = None, average_batch_stats: bool = False,
              augment_fn: Callable | None = None,
              probe_tx: optax.GradientTransformation | None = None):
    """One BYOL update.

    state.method_state is the target network, {"momentum_params", "momentum_batch_stats"}
    (`jaxssl.state.momentum_encoder` of the initial encoder). apply_fn's outputs need
    "prediction" (`models.create_model(predictor_hidden_dims=...)`). The loss is
    byol_loss(p1, z2') + byol_loss(p2, z1'): p the online predictions, z' the target's
    projections of the other view. After the optimizer step the target moves towards the new
    online parameters with m = momentum_fn(step) (0.996 to 1 on a cosine in the paper:
    `jaxssl.ema.cosine_momentum`). Other arguments as for `jaxssl.steps.simclr_step`. Returns
    (state, metrics): "train/loss", "train/ema_momentum", "train/grad_norm" (and the probe's).
    """
    def loss_fn(online, target):
        loss = (byol_loss(online[0]["prediction"], target[1]["projection"], axis_name=axis_name)
                + byol_loss(online[1]["prediction"], target[0]["projection"],
                            axis_name=axis_name))
        return loss, {}

    return base.two_view_step(state, batch, key, loss_fn=loss_fn, apply_fn=apply_fn, tx=tx,
                              momentum_fn=momentum_fn, axis_name=axis_name,
                              average_batch_stats=average_batch_stats, augment_fn=augment_fn,
                              probe_tx=probe_tx)


def config_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.momentum = 0.996  # the target's EMA momentum at the start (the paper; 0.99 on CIFAR)
    g.momentum_schedule = "cosine"  # to 1 at the end; or "constant"
    return g


def bind(exp) -> Callable:
    g = exp.config.byol
    return base.bound(byol_step, exp, momentum_fn=base.momentum_fn(
        g.momentum, g.momentum_schedule, exp.total_steps))


METHOD = base.Method(name="byol", title="BYOL", step=byol_step, bind=bind,
                     init_state=base.init_momentum_encoder, config_group=config_group,
                     validate=lambda config: base.check_momentum_group(config.byol, "byol"),
                     predictor=True)
