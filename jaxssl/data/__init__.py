"""Data: sources, two-view augmentation (host TensorFlow and device JAX), the input pipeline.

This is the only package of jaxssl that imports TensorFlow, and only inside the functions that
need it (see `jaxssl.data.tf_import`), so the device path works where TensorFlow is absent.
"""
