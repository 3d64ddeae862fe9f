import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["jaxssl", "jaxssl.losses", "jaxssl.steps", "jaxssl.parallel",
                                    "jaxssl.optim", "jaxssl.models", "jaxssl.state",
                                    "jaxssl.data.pipeline", "jaxssl.data.tfds_stream"])
def test_no_tensorflow_import(module):
    code = (f"import sys, {module}; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
