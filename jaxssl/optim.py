"""Optimizers (LARS, SGD with momentum, AdamW), weight-decay masks, schedules, lr scaling.

Biases and BatchNorm parameters (every leaf of rank <= 1) are excluded from weight decay and
from LARS's trust-ratio adaptation, as in SimCLR, BYOL and MoCo v3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import jax
import optax

__all__ = [
    "OPTIMIZERS",
    "LR_SCALING",
    "decay_mask",
    "scale_learning_rate",
    "warmup_cosine_schedule",
    "warmup_constant_schedule",
    "make_optimizer",
]


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay and LARS adaptation (kernels), False for biases
    and BatchNorm scales/shifts (rank <= 1). Same structure as params."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


LR_SCALING = {
    "linear": lambda base, batch: base * batch / 256.0,  # Goyal et al.; SimCLR at large batch
    "sqrt": lambda base, batch: base * math.sqrt(batch),  # SimCLR's small-batch rule
    "none": lambda base, batch: base,
}


def scale_learning_rate(base_lr: float, global_batch: int, rule: str) -> float:
    """The peak learning rate: base_lr x B/256 ("linear"), x sqrt(B) ("sqrt"), or as is."""
    if rule not in LR_SCALING:
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {sorted(LR_SCALING)}")
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive; got {global_batch}")
    return LR_SCALING[rule](base_lr, global_batch)


def warmup_cosine_schedule(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> Callable:
    """Linear warmup from 0 to peak_lr over warmup_steps, then cosine decay to end_lr at
    total_steps (and end_lr after). step -> float32 learning rate."""
    if total_steps <= 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps > 0; "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if warmup_steps == total_steps:  # all warmup (a very short run): no room for the cosine
        return optax.linear_schedule(0.0, peak_lr, transition_steps=warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=end_lr,
    )


def warmup_constant_schedule(peak_lr: float, warmup_steps: int) -> Callable:
    """Linear warmup from 0 to peak_lr over warmup_steps, then peak_lr for ever (SimSiam's
    predictor, whose learning rate does not decay). step -> learning rate."""
    if warmup_steps < 0:
        raise ValueError(f"need warmup_steps >= 0; got {warmup_steps}")
    if warmup_steps == 0:
        return optax.constant_schedule(peak_lr)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps),
                                 optax.constant_schedule(peak_lr)], [warmup_steps])


def _lars(lr, *, weight_decay, momentum, trust_coefficient, **_):
    return optax.lars(
        lr,
        weight_decay=weight_decay,
        weight_decay_mask=decay_mask,
        trust_coefficient=trust_coefficient,
        eps=0.0,
        trust_ratio_mask=decay_mask,
        momentum=momentum,
        nesterov=False,
    )


def _sgd(lr, *, weight_decay, momentum, nesterov, **_):
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=momentum or None, nesterov=nesterov),
    )


def _adamw(lr, *, weight_decay, b1, b2, **_):
    return optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)


OPTIMIZERS = {"lars": _lars, "sgd": _sgd, "adamw": _adamw}


def make_optimizer(
    name: str,
    learning_rate: float | Callable,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    trust_coefficient: float = 0.001,
    b1: float = 0.9,
    b2: float = 0.999,
    group_learning_rates: Mapping[str, float | Callable] | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer from OPTIMIZERS with the bias/BN mask applied.

    learning_rate: a float or a schedule (step -> lr). momentum/nesterov: SGD and LARS;
    trust_coefficient: LARS; b1/b2: AdamW. Weight decay is coupled (added to the gradient) for
    SGD and LARS, decoupled for AdamW.
    group_learning_rates: {top-level key of the params: its own learning rate}, e.g.
    {"predictor": warmup-then-constant} for SimSiam's predictor, whose learning rate does not
    decay. The same optimizer (and weight decay) runs on each group, so with equal learning
    rates the updates are those of one optimizer over all the parameters. The params the
    optimizer is initialised with must be a dict with the groups' keys.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")

    def make(lr):
        return OPTIMIZERS[name](lr, weight_decay=weight_decay, momentum=momentum,
                                nesterov=nesterov, trust_coefficient=trust_coefficient,
                                b1=b1, b2=b2)

    if not group_learning_rates:
        return make(learning_rate)
    groups = dict(group_learning_rates)

    def labels(params):
        missing = sorted(set(groups) - set(params))
        if missing:
            raise ValueError(f"no parameters under {missing} for their own learning rate; "
                             f"the params have {sorted(params)}")
        return {key: jax.tree.map(lambda _, k=key: k if k in groups else "", value)
                for key, value in params.items()}

    transforms = {"": make(learning_rate), **{k: make(lr) for k, lr in groups.items()}}
    return optax.multi_transform(transforms, labels)
