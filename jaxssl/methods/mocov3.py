"""MoCo v3 (Chen, Xie & He 2021) with a ResNet: a predictor on the trained encoder, a momentum
encoder on a cosine schedule, the symmetric InfoNCE against the momentum keys of the global
batch (no queue). Fields under `mocov3`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxssl.losses import mocov3_loss_with_accuracy
from jaxssl.methods import base

__all__ = ["mocov3_step", "METHOD"]


def mocov3_step(state, batch: Any, key: jax.Array, *, apply_fn: Callable,
                tx: optax.GradientTransformation, momentum_fn: Callable,
                temperature: float = 0.2, axis_name: str | None = None,
                average_batch_stats: bool = False, augment_fn: Callable | None = None,
                probe_tx: optax.GradientTransformation | None = None):
    """One MoCo v3 update: loss = `mocov3_loss`(q1, q2, k1, k2) with q the online predictions
    and k the momentum encoder's projections (2T-scaled, as in the paper; T = 0.2 is solo-learn's
    CIFAR value and the paper's ViT one, its ResNet-50 code uses 1.0). state.method_state
    and momentum_fn as for `jaxssl.methods.byol.byol_step`. Returns (state, metrics):
    "train/loss", "train/contrastive_top1", "train/ema_momentum", "train/alignment" and
    "train/uniformity" (of q1 and k2), "train/grad_norm" (and the probe's)."""
    def loss_fn(online, target):
        q1, q2 = online[0]["prediction"], online[1]["prediction"]
        k1, k2 = target[0]["projection"], target[1]["projection"]
        loss, accuracy = mocov3_loss_with_accuracy(q1, q2, k1, k2, temperature=temperature,
                                                   axis_name=axis_name)
        align, uniform = base.alignment_uniformity(q1, k2, axis_name=axis_name)
        return loss, {"train/contrastive_top1": accuracy, "train/alignment": align,
                      "train/uniformity": uniform}

    return base.two_view_step(state, batch, key, loss_fn=loss_fn, apply_fn=apply_fn, tx=tx,
                              momentum_fn=momentum_fn, axis_name=axis_name,
                              average_batch_stats=average_batch_stats, augment_fn=augment_fn,
                              probe_tx=probe_tx)


def config_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    # 0.2: solo-learn's CIFAR value and the paper's ViT setting (its ResNet-50 code uses 1.0).
    g.temperature = 0.2
    g.momentum = 0.99  # at the start; to 1 at the end with "cosine"
    g.momentum_schedule = "cosine"
    return g


def validate(config) -> None:
    from jaxssl.configuration import _check

    base.check_momentum_group(config.mocov3, "mocov3")
    _check(config.mocov3.temperature > 0, f"mocov3.temperature must be positive (0.2 for CIFAR "
                                          f"and ViTs, 1.0 for a ResNet-50 on ImageNet); got "
                                          f"{config.mocov3.temperature}")


def bind(exp) -> Callable:
    g = exp.config.mocov3
    return base.bound(mocov3_step, exp, temperature=g.temperature, momentum_fn=base.momentum_fn(
        g.momentum, g.momentum_schedule, exp.total_steps))


METHOD = base.Method(name="mocov3", title="MoCo v3", step=mocov3_step, bind=bind,
                     init_state=base.init_momentum_encoder, config_group=config_group,
                     validate=validate, predictor=True, contrastive=True)
