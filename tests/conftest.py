"""Test setup: 8 fake CPU devices, so every sharded computation is tested against one device.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any
test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiled programs are cached on disk for the session (and for the trainer subprocesses the
# tests start, which inherit the variable): the trainer tests compile the same step many times.
# The cache holds XLA's output for identical programs, so results are unchanged.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
