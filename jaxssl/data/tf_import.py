"""The one place jaxssl imports TensorFlow: lazily, with accelerators hidden from it."""

from __future__ import annotations

import functools
import os


@functools.cache
def tf():
    """The tensorflow module, configured so it never takes GPU or TPU memory from JAX."""
    # TensorFlow's C++ start-up notices (oneDNN, absl) are not the user's business; a user who
    # sets the variable keeps their own level.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf_module
    except ImportError as e:  # a GPU host may have no TensorFlow at all
        raise ImportError(
            "this data path needs TensorFlow (pip install tensorflow-cpu); without it use the "
            "in-memory arrays path with device augmentation (augment='device')"
        ) from e
    try:
        tf_module.config.set_visible_devices([], "GPU")
        tf_module.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # already initialised or no such device type: nothing to hide
    return tf_module
