"""Projection heads: MLPs from backbone features to the contrastive embedding space."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxssl.models.resnet import BN_EPSILON, BN_MOMENTUM

Dtype = Any


class ProjectionHead(nn.Module):
    """MLP head: features [N, F] -> projections [N, out_dim] float32.

    Hidden layers are Dense (no bias) -> BatchNorm -> ReLU, the last layer is Dense, optionally
    followed by a BatchNorm without learnt shift. SimCLR v1 is `hidden_dims=(2048,),
    out_dim=128` (2 layers); SimCLR v2 `hidden_dims=(2048, 2048)` (3 layers); MoCo v2
    `hidden_dims=(2048,), output_bn=False` with a bias on the last layer.

    Attributes:
      hidden_dims: widths of the hidden layers; () gives a linear head.
      out_dim: embedding width D.
      output_bn: BatchNorm (scale only) on the output, as SimCLR's TPU code does.
      bn_axis_name: as in `ResNet`.
      dtype: compute dtype; parameters stay float32.
    """

    hidden_dims: Sequence[int] = (2048,)
    out_dim: int = 128
    output_bn: bool = False
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        def bn(name, use_bias=True):
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                use_fast_variance=False,  # two passes, as the backbone's (resnet._norm says why)
                use_bias=use_bias,
                axis_name=self.bn_axis_name if train else None,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                         name=f"dense{i}")(x)
            x = nn.relu(bn(f"bn{i}")(x))
        x = nn.Dense(self.out_dim, use_bias=not self.output_bn, dtype=self.dtype,
                     param_dtype=jnp.float32, name="out")(x)
        if self.output_bn:
            x = bn("out_bn", use_bias=False)(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays (tests)
