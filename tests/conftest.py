"""Test setup: 8 fake CPU devices, so every sharded computation is tested against one device.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any
test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The tests' programs are tiny and most of their time is compilation: LLVM's optimisation of
# XLA:CPU's generated code is skipped (measured on 2 cores with a cold cache: tests/
# test_methods.py 170 s instead of 239, test_augment_agreement + test_knn + test_train 233 s
# instead of 285). The HLO passes are unchanged, but floats come out different in the last bits
# (6 SimCLR steps of the tests' ResNet: loss 3.80 against 3.89), as on another CPU: every
# comparison in the tests is between runs under the same flags, or against a reference within
# a tolerance. JAXSSL_TEST_XLA_OPT=1 runs the suite at the default level.
if (os.environ.get("JAXSSL_TEST_XLA_OPT") != "1"
        and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiled programs are cached on disk for the session (and for the trainer subprocesses the
# tests start, which inherit the variable): the trainer tests compile the same step many times.
# The cache holds XLA's output for identical programs, so results are unchanged.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
