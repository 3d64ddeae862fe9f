"""Self-supervised methods, one module each, behind one registry.

    METHODS[config.method] -> base.Method

A method module holds its pure step (the public API, `(state, batch, key, **kwargs) ->
(state, metrics)`), its config group (`config.<name>`) and its validation, how its own state
(`TrainState.method_state`) starts, and `bind(exp)`, which binds the step's keywords from a
config. Everything around it (data, placement, checkpoints, evaluation) is shared. Adding a
method: a module here, a line below, its config in configs/ and its tests (README, "Adding a
method").
"""

from __future__ import annotations

from jaxssl.methods import barlow_twins, base, byol, moco, mocov3, simclr, simsiam, vicreg
from jaxssl.methods.base import Method

__all__ = ["METHODS", "Method", "get", "base"]

METHODS: dict[str, Method] = {m.name: m for m in (
    simclr.METHOD,
    moco.METHOD,
    byol.METHOD,
    simsiam.METHOD,
    barlow_twins.METHOD,
    vicreg.METHOD,
    mocov3.METHOD,
)}


def get(name: str) -> Method:
    """The registered method called `name`; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
