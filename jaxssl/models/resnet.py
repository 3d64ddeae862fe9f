"""ResNet-18/34/50 backbones with torchvision's topology, as Flax Linen modules.

Layer names follow torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `.../downsample_conv`) so that
parameters map one to one onto `torchvision.models.resnet*` state dicts. Convolutions carry no
bias; each is followed by BatchNorm. Bottleneck blocks put the stride on the 3x3 convolution
(torchvision's "ResNet v1.5"). Padding is explicit, as in PyTorch, not "SAME".
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# PyTorch's BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch; eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        # He (fan-out) init as torchvision: kaiming_normal_(mode="fan_out", relu).
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def _norm(train: bool, axis_name: str | None, dtype: Dtype, name: str,
          zero_init: bool = False) -> nn.BatchNorm:
    """BatchNorm whose statistics are also reduced over `axis_name` (global BN) when it is set."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Two-pass variance, mean((x - mean)^2): the one-pass E[x^2] - E[x]^2 cancels in float32
        # where |mean| >> std. Seen: with XLA:CPU at optimisation level 0, 3 steps of the tiny
        # test net ended 7.5e-4 (relative norm) away from the float64 result, gradient norm off
        # by 2.3e-3; with two passes 1.7e-7, float32 rounding.
        use_fast_variance=False,
        axis_name=axis_name if train else None,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


class _Block(nn.Module):
    """Fields shared by the residual blocks; `features` is the width of the inner convolutions."""

    features: int
    stride: int
    train: bool
    bn_axis_name: str | None
    zero_init_last_bn: bool
    dtype: Dtype

    def _norm(self, name: str, zero_init: bool = False) -> nn.BatchNorm:
        return _norm(self.train, self.bn_axis_name, self.dtype, name, zero_init)

    def _shortcut(self, x, out: int):
        if self.stride != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.stride, "downsample_conv", self.dtype)(x)
            x = self._norm("downsample_bn")(x)
        return x


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34). x: [N, H, W, C] -> [N, H/s, W/s, features]."""

    @nn.compact
    def __call__(self, x):
        norm = self._norm
        y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
        y = nn.relu(norm("bn1")(y))
        y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
        y = norm("bn2", self.zero_init_last_bn)(y)
        return nn.relu(self._shortcut(x, self.features) + y)


class Bottleneck(_Block):
    """1x1 -> 3x3 (strided) -> 1x1 x4 (ResNet-50). x: [N, H, W, C] -> [N, H/s, W/s, 4*features]."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        norm = self._norm
        out = self.features * self.expansion
        y = _conv(self.features, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(norm("bn1")(y))
        y = _conv(self.features, 3, self.stride, "conv2", self.dtype)(y)
        y = nn.relu(norm("bn2")(y))
        y = _conv(out, 1, 1, "conv3", self.dtype)(y)
        y = norm("bn3", self.zero_init_last_bn)(y)
        return nn.relu(self._shortcut(x, out) + y)


class ResNet(nn.Module):
    """ResNet backbone: images [N, H, W, 3] -> globally pooled features [N, F] float32.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: BasicBlock or Bottleneck.
      width: channels of the first stage (64 in the paper; tiny values for tests).
      cifar_stem: 3x3 stride-1 first convolution and no max-pool (for 32 px images) instead of
        the 7x7 stride-2 convolution and 3x3 stride-2 max-pool.
      zero_init_last_bn: initialise the last BN scale of every residual block to zero.
      bn_axis_name: mesh axis over which training-mode BN statistics are averaged (global BN);
        None for per-device statistics. See `jaxssl.parallel.BN_MODES`.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    """

    stage_sizes: Sequence[int]
    block: type = BasicBlock
    width: int = 64
    cifar_stem: bool = False
    zero_init_last_bn: bool = False
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = _conv(self.width, 3, 1, "conv1", self.dtype)(x)
        else:
            x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
        x = _norm(train, self.bn_axis_name, self.dtype, "bn1")(x)
        x = nn.relu(x)
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = self.block(
                    features=self.width * 2**i,
                    stride=2 if i > 0 and j == 0 else 1,
                    train=train,
                    bn_axis_name=self.bn_axis_name,
                    zero_init_last_bn=self.zero_init_last_bn,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x)
        # Pool in float32 (float64 stays float64, for tests): the representation downstream
        # probes and losses consume.
        return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)

# Feature width of each backbone at width=64 (the input of a projection head).
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
