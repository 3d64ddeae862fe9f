"""Top-k accuracy with the same tie-breaking as argmax, shared by every evaluation.

A label is in the top k when its rank, the number of classes that score higher or score the
same with a smaller index, is below k: exactly the classes `argmax` and `jax.lax.top_k` would
pick first, so top-1 here equals argmax accuracy even when scores tie (a collapsed encoder's
kNN votes, an untrained classifier's equal logits).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["label_rank", "topk_correct"]


def label_rank(scores, labels):
    """scores [n, C] float, labels int [n] -> int32 [n]: how many classes come before the label
    (higher score, or the same score and a smaller class index)."""
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels).astype(jnp.int32)
    own = jnp.take_along_axis(scores, labels[:, None], axis=1)
    classes = jnp.arange(scores.shape[1])[None, :]
    before = (scores > own) | ((scores == own) & (classes < labels[:, None]))
    return jnp.sum(before, axis=1, dtype=jnp.int32)


def topk_correct(scores, labels, k: int, *, require_positive: bool = False):
    """1.0 where the label is among the top k (see the module docstring), else 0.0: float32 [n].

    require_positive: a label whose score is not > 0 never counts (kNN: a class no neighbour
    voted for is not a prediction, however few classes got votes).
    """
    scores = jnp.asarray(scores)
    hit = label_rank(scores, labels) < k
    if require_positive:
        own = jnp.take_along_axis(scores, jnp.asarray(labels).astype(jnp.int32)[:, None], axis=1)
        hit = hit & (own[:, 0] > 0)
    return hit.astype(jnp.float32)
