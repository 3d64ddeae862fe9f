"""Pure train steps: (state, batch, key) -> (new_state, metrics).

No I/O, no jit, no config objects: bind the keyword-only dependencies once with
functools.partial and compile with `jaxssl.parallel.compile_step` (or your own jit/shard_map).

Each method's step lives in its module of `jaxssl.methods` (`jaxssl.methods.byol.byol_step`,
...); SimCLR's and MoCo v2's are importable from here too, as they were before that package.
"""

from __future__ import annotations

from jaxssl.methods.barlow_twins import barlow_twins_step
from jaxssl.methods.base import example_keys
from jaxssl.methods.byol import byol_step
from jaxssl.methods.moco import moco_step
from jaxssl.methods.mocov3 import mocov3_step
from jaxssl.methods.simclr import simclr_step
from jaxssl.methods.simsiam import simsiam_step
from jaxssl.methods.vicreg import vicreg_step

__all__ = ["simclr_step", "moco_step", "byol_step", "simsiam_step", "barlow_twins_step",
           "vicreg_step", "mocov3_step", "example_keys"]
