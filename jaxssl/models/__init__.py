"""Encoders (ResNets), projection heads, and the glue that turns any Flax model into an apply_fn.

The apply_fn signature every step in jaxssl takes:

    apply_fn(params, batch_stats, images, *, train) -> (outputs, new_batch_stats)

    images:  [N, H, W, C] float
    outputs: {"projection": [N, D] (the contrastive embedding), "features": [N, F] (optional,
              the backbone representation used by probes), "prediction": [N, D] (a
              predictor's output, for the methods that have one)}
    new_batch_stats: the updated BatchNorm statistics pytree (the input one when not training
              or when the model has none).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models.heads import ProjectionHead
from jaxssl.models.resnet import (
    FEATURE_DIMS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
)

__all__ = [
    "ENCODERS",
    "FEATURE_DIMS",
    "BasicBlock",
    "Bottleneck",
    "ContrastiveModel",
    "ProjectionHead",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "create_model",
    "flax_apply_fn",
    "init_variables",
    "split_bn_apply_fn",
]

ENCODERS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50}


class ContrastiveModel(nn.Module):
    """Backbone + projection head (+ predictor): images [N, H, W, C] -> {"features",
    "projection"} float32, and "prediction" (the predictor applied to the projection: BYOL,
    SimSiam, MoCo v3) when the model has a predictor."""

    backbone: nn.Module
    head: nn.Module
    predictor: nn.Module | None = None

    def __call__(self, x, train: bool = True):
        features = self.backbone(x, train=train)
        out = {"features": features, "projection": self.head(features, train=train)}
        if self.predictor is not None:
            out["prediction"] = self.predictor(out["projection"], train=train)
        return out


def create_model(
    encoder: str = "resnet50",
    *,
    cifar_stem: bool = False,
    width: int = 64,
    zero_init_last_bn: bool = False,
    head_hidden_dims: Sequence[int] = (2048,),
    out_dim: int = 128,
    output_bn: bool = False,
    bn_axis_name: str | None = None,
    dtype: Any = jnp.float32,
    predictor_hidden_dims: Sequence[int] | None = None,
) -> ContrastiveModel:
    """A ResNet from `ENCODERS` with a `ProjectionHead`. Arguments as in `ResNet`/`ProjectionHead`.

    predictor_hidden_dims: None for no predictor; else the hidden widths of a predictor MLP
    (a `ProjectionHead` from out_dim to out_dim: BYOL's is (4096,), SimSiam's (512,)).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
    backbone = ENCODERS[encoder](
        width=width,
        cifar_stem=cifar_stem,
        zero_init_last_bn=zero_init_last_bn,
        bn_axis_name=bn_axis_name,
        dtype=dtype,
    )
    head = ProjectionHead(
        hidden_dims=tuple(head_hidden_dims),
        out_dim=out_dim,
        output_bn=output_bn,
        bn_axis_name=bn_axis_name,
        dtype=dtype,
    )
    predictor = None if predictor_hidden_dims is None else ProjectionHead(
        hidden_dims=tuple(predictor_hidden_dims), out_dim=out_dim, output_bn=False,
        bn_axis_name=bn_axis_name, dtype=dtype)
    return ContrastiveModel(backbone=backbone, head=head, predictor=predictor)


def init_variables(module: nn.Module, key: jax.Array, image_shape: Sequence[int], *,
                   jit: bool = False):
    """Initialise a Flax module on zeros of `image_shape` ([N, H, W, C]) in eval mode.

    jit=True compiles the initialisation as one program: for a full-size ResNet on a CPU that
    takes seconds where dispatching its hundreds of ops one by one takes over ten; for a tiny
    test model the eager way is quicker.

    Eval mode means BatchNorm needs no mesh axis at init. Returns (params, batch_stats);
    batch_stats is {} for a module without BatchNorm.
    """
    init = functools.partial(module.init, train=False)
    if jit:
        init = jax.jit(init)
    variables = init(key, jnp.zeros(image_shape, jnp.float32))
    return variables["params"], variables.get("batch_stats", {})


def flax_apply_fn(module: nn.Module) -> Callable:
    """An apply_fn (signature in this module's docstring) for any Flax Linen module.

    The module is called as `module(images, train=...)` and may return a dict with
    "projection" (and optionally "features") or a bare [N, D] array, taken as the projection.
    """

    def apply_fn(params, batch_stats, images, *, train: bool):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train and batch_stats:
            out, mutated = module.apply(variables, images, train=True, mutable=["batch_stats"])
            new_batch_stats = mutated["batch_stats"]
        else:
            out = module.apply(variables, images, train=train)
            new_batch_stats = batch_stats
        if not isinstance(out, Mapping):
            out = {"projection": out}
        return dict(out), new_batch_stats

    return apply_fn


def split_bn_apply_fn(apply_fn: Callable, groups: int) -> Callable:
    """An apply_fn whose BatchNorm statistics are computed over `groups` equal parts of the batch.

    Split BN (MoCo's CIFAR recipe): one device behaves like `groups` devices that each normalise
    their own part, as per-device BN over a mesh does. The running statistics of the groups are
    averaged, as `average_batch_stats` averages them over devices. groups=1 returns apply_fn.
    """
    if groups < 1:
        raise ValueError(f"BatchNorm groups must be >= 1; got {groups}")
    if groups == 1:
        return apply_fn

    def grouped(params, batch_stats, images, *, train: bool):
        n = images.shape[0]
        if n % groups:
            raise ValueError(f"split BN: the batch ({n}) must divide into {groups} groups")
        parts = images.reshape(groups, n // groups, *images.shape[1:])
        outputs, new_stats = jax.vmap(
            lambda x: apply_fn(params, batch_stats, x, train=train))(parts)
        outputs = jax.tree.map(lambda y: y.reshape(n, *y.shape[2:]), outputs)
        return outputs, jax.tree.map(lambda s: jnp.mean(s, axis=0), new_stats)

    return grouped
