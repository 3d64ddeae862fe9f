"""SimCLR (Chen et al. 2020): NT-Xent over the 2N views of the global batch. No state of its
own; its fields are `loss.temperature` and `loss.block_size`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxssl.losses import info_nce_blockwise_with_accuracy, info_nce_with_accuracy
from jaxssl.methods import base

__all__ = ["simclr_step", "METHOD"]


def simclr_step(
    state,
    batch: Any,
    key: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    temperature: float,
    axis_name: str | None = None,
    average_batch_stats: bool = False,
    augment_fn: Callable | None = None,
    probe_tx: optax.GradientTransformation | None = None,
    loss_block_size: int = 0,
) -> tuple[Any, dict[str, jax.Array]]:
    """One SimCLR update.

    Args:
      state: TrainState (replicated when sharded).
      batch: (x1, x2), each [b, H, W, C] float: two augmented views of the same b images (the
        local shard of the global batch inside shard_map). With `augment_fn`, raw images
        [b, H, W, C] (any dtype augment_fn accepts) instead. Or a dict holding those as
        "views" (or "images") and the labels int32 [b] as "labels" (needed by probe_tx).
      key: root PRNG key; each example's key is derived from it, the step and the example's
        global position (`example_keys`).
      apply_fn: `apply_fn(params, batch_stats, images, *, train) -> (outputs, new_batch_stats)`,
        outputs["projection"]: [N, D]; see `jaxssl.models.flax_apply_fn`.
      tx: optax transformation; its state is state.opt_state.
      temperature: InfoNCE temperature (> 0).
      axis_name: mesh axis of the data when run under shard_map; the loss then contrasts against
        the whole global batch and the gradient is the global one.
      average_batch_stats: with per-device BatchNorm (BN_MODES["local"]), average the new
        running statistics over axis_name so the state stays identical on all devices. Leave
        False for global BN, whose statistics are already identical.
      augment_fn: optional `augment_fn(batch, keys) -> (x1, x2)` run on the device, keys [b]
        one per local example (e.g. `jaxssl.data.augment_jax.make_device_augment`).
      probe_tx: the online probe's optimizer (`jaxssl.probe`): state.probe is trained on the
        stop-gradient backbone features of both views and the batch's labels. It does not
        change the encoder's update.
      loss_block_size: 0 computes the loss with `info_nce` (all [2b, 2N] logits at once); > 0
        with `info_nce_blockwise` in tiles of this side: the same loss and gradient in memory
        that does not grow with b x N, for global batches whose logits would not fit.

    Returns:
      (new_state, metrics) with float32 scalar metrics "train/loss",
      "train/contrastive_top1", "train/grad_norm", "train/alignment", "train/uniformity" (and
      the probe's "train/online_loss", "train/online_top1"), equal on every device.
    """
    x1, x2, labels = base.views_and_labels(batch, key, state.step, augment_fn, axis_name)
    b = x1.shape[0]

    def loss_fn(params):
        # Both views go through the encoder as one batch, so BatchNorm statistics are
        # computed over all 2b views together (as SimCLR does).
        outputs, new_batch_stats = apply_fn(
            params, state.batch_stats, jnp.concatenate([x1, x2], axis=0), train=True)
        z = outputs["projection"]
        if loss_block_size:
            loss, accuracy = info_nce_blockwise_with_accuracy(
                z[:b], z[b:], temperature=temperature, axis_name=axis_name,
                block_size=loss_block_size)
        else:
            loss, accuracy = info_nce_with_accuracy(z[:b], z[b:], temperature=temperature,
                                                    axis_name=axis_name)
        return loss, (accuracy, new_batch_stats, outputs.get("features"), z)

    # The loss is already the global mean (pmean inside info_nce), so under shard_map the
    # gradient with respect to the replicated parameters is the global gradient.
    (loss, (accuracy, new_batch_stats, features, z)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, new_batch_stats, tx=tx, axis_name=axis_name,
                                     average_batch_stats=average_batch_stats)
    align, uniform = base.alignment_uniformity(z[:b], z[b:], axis_name=axis_name)
    metrics = {"train/loss": loss, "train/contrastive_top1": accuracy,
               "train/alignment": align, "train/uniformity": uniform}
    # Rows [0, b) of the features are view 1 and [b, 2b) view 2 of the same b images.
    return base.finish(new_state, metrics, grads, features=features,
                       labels=None if labels is None else jnp.concatenate([labels, labels]),
                       probe_tx=probe_tx, axis_name=axis_name)


def bind(exp) -> Callable:
    loss = exp.config.loss
    return base.bound(simclr_step, exp, temperature=loss.temperature,
                      loss_block_size=loss.block_size)


METHOD = base.Method(name="simclr", title="SimCLR", step=simclr_step, bind=bind,
                     contrastive=True)
