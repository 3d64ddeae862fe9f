"""jaxssl: self-supervised contrastive learning of image representations in JAX.

Import the submodules you need (`jaxssl.losses`, `jaxssl.steps`, `jaxssl.parallel`,
`jaxssl.optim`, `jaxssl.models`, `jaxssl.state`); importing this package loads none of them,
and nothing outside `jaxssl.data` imports TensorFlow.
"""

__version__ = "0.1.0"


class JaxsslWarning(UserWarning):
    """A warning about the user's data or settings (not about jaxssl's code): `jaxssl` on the
    command line prints it as one line, `jaxssl: warning: ...`; a library caller gets a Python
    warning of this class (a UserWarning)."""
