"""VICReg (Bardes et al. 2022): invariance, variance and covariance terms on the expander's
embeddings, every statistic over the global batch. Fields under `vicreg`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxssl.losses import vicreg_loss_with_terms
from jaxssl.methods import base

__all__ = ["vicreg_step", "METHOD"]


def vicreg_step(state, batch: Any, key: jax.Array, *, apply_fn: Callable,
                tx: optax.GradientTransformation, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0,
                axis_name: str | None = None, average_batch_stats: bool = False,
                augment_fn: Callable | None = None,
                probe_tx: optax.GradientTransformation | None = None):
    """One VICReg update with `vicreg_loss_with_terms`. Other arguments as for
    `jaxssl.steps.simclr_step`. Returns (state, metrics): "train/loss", "train/invariance",
    "train/variance", "train/covariance" (unweighted), "train/grad_norm" (and the probe's)."""
    def loss_fn(online, _):
        loss, terms = vicreg_loss_with_terms(
            online[0]["projection"], online[1]["projection"], sim_coeff=sim_coeff,
            std_coeff=std_coeff, cov_coeff=cov_coeff, axis_name=axis_name)
        return loss, {f"train/{k}": v for k, v in terms.items()}

    return base.two_view_step(state, batch, key, loss_fn=loss_fn, apply_fn=apply_fn, tx=tx,
                              axis_name=axis_name, average_batch_stats=average_batch_stats,
                              augment_fn=augment_fn, probe_tx=probe_tx)


def config_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.sim_coeff = 25.0
    g.std_coeff = 25.0
    g.cov_coeff = 1.0
    return g


def validate(config) -> None:
    from jaxssl.configuration import _check

    for field in ("sim_coeff", "std_coeff", "cov_coeff"):
        value = config.vicreg[field]
        _check(value >= 0, f"vicreg.{field} must be >= 0 (the paper: 25, 25, 1); got {value}")


def bind(exp) -> Callable:
    g = exp.config.vicreg
    return base.bound(vicreg_step, exp, sim_coeff=g.sim_coeff, std_coeff=g.std_coeff,
                      cov_coeff=g.cov_coeff)


METHOD = base.Method(name="vicreg", title="VICReg", step=vicreg_step, bind=bind,
                     config_group=config_group, validate=validate)
