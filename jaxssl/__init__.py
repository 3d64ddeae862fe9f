"""jaxssl: self-supervised contrastive learning of image representations in JAX.

Import the submodules you need (`jaxssl.losses`, `jaxssl.steps`, `jaxssl.parallel`,
`jaxssl.optim`, `jaxssl.models`, `jaxssl.state`); importing this package loads none of them,
and nothing outside `jaxssl.data` imports TensorFlow.
"""

__version__ = "0.1.0"
