"""Fine-tuning with a fraction of the labels (SimCLR's semi-supervised protocol).

The pretrained backbone and a new linear classifier are trained together on a class-balanced
subset of the labelled train split (1% or 10% in SimCLR), with random resized crops and flips
only, Nesterov SGD, cosine decay and no regularisation; then top-1/top-5 are measured on the
test split in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxssl.data.augment_jax import augment_view
from jaxssl.data.recipes import ViewRecipe
from jaxssl.state import TrainState
from jaxssl.methods.base import apply_gradients, example_keys

__all__ = ["label_fraction", "Classifier", "finetune_step", "finetune_augment"]


def label_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced `fraction` of the examples: int64 [n], sorted.

    Each class c contributes max(1, round(fraction * count_c)) examples, the first ones of a
    permutation of that class drawn from (seed, c): the subset depends only on the labels, the
    fraction and the seed, and a smaller fraction's subset is contained in a larger one's.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"the label fraction must lie in (0, 1]; got {fraction}")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, int(c)]).permutation(members)
        chosen.append(order[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class Classifier(nn.Module):
    """A backbone and a linear classifier: images [N, H, W, C] -> {"logits": [N, classes]
    float32, "features": [N, F]}. Parameters: {"backbone": ..., "classifier": ...}."""

    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        features = self.backbone(x, train=train)
        logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                          param_dtype=jnp.float32, name="classifier")(features)
        return {"logits": logits.astype(jnp.float32), "features": features}


def finetune_augment(out_size: int, mean, std, crop_scale=(0.08, 1.0), dtype=jnp.float32):
    """augment_fn(images uint8 [b, H, W, 3], keys [b]) -> float [b, S, S, 3]: a random resized
    crop (scale `crop_scale`) and a horizontal flip, normalised; nothing else."""
    view = ViewRecipe(crop_scale=tuple(crop_scale), flip_prob=0.5, jitter_prob=0.0,
                      grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)

    def augment_fn(images, keys):
        return jax.vmap(lambda k, im: augment_view(k, im, view, out_size, ("crop", "flip"),
                                                   mean, std))(keys, images).astype(dtype)

    return augment_fn


def finetune_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    augment_fn: Callable,
    axis_name: str | None = None,
    average_batch_stats: bool = False,
) -> tuple[TrainState, dict[str, Any]]:
    """One supervised update of the whole network.

    batch: {"images": uint8 [b, H, W, 3], "labels": int32 [b]} (this device's rows).
    apply_fn: as for the SSL steps, with outputs["logits"] [b, C] (`Classifier`). With
    axis_name the loss is the global mean (equal rows per device), so the gradient with
    respect to the replicated params is the global one. Returns (state, {"train/loss",
    "train/top1"}), float32 scalars equal on every device.
    """
    images, labels = batch["images"], batch["labels"]
    x = augment_fn(images, example_keys(key, state.step, images.shape[0], axis_name))

    def loss_fn(params):
        outputs, new_stats = apply_fn(params, state.batch_stats, x, train=True)
        logits = outputs["logits"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        top1 = jnp.mean(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        if axis_name is not None:
            loss, top1 = jax.lax.pmean((loss, top1), axis_name)
        return loss, (top1, new_stats)

    (loss, (top1, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, new_stats, tx=tx, axis_name=axis_name,
                                average_batch_stats=average_batch_stats)
    return new_state, {"train/loss": loss, "train/top1": top1}
