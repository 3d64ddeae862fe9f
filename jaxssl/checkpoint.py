"""Checkpoints of the train state with orbax: asynchronous, atomic, the last few and the best.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment (even mid-write) leaves the previous complete checkpoint as the latest.
The data pipeline is stateless (see `jaxssl.data.pipeline`), so the train state alone is
enough to resume exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

__all__ = ["Checkpointer", "IncompatibleCheckpointError"]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in a workdir does not fit the state being restored."""


class Checkpointer:
    """Saves and restores a TrainState under `directory` (a local path or gs:// URL).

    keep_last: how many of the most recent checkpoints to keep.
    best_metric: a metric name passed to `save(..., metrics=)`; the best checkpoint by it is kept
      too (`best_mode` "max" or "min"). None keeps only the last ones.
    """

    def __init__(self, directory: str, *, keep_last: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {keep_last}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
        policies = [checkpoint_managers.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                n=1, keep_checkpoints_without_metrics=False))
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        # Replica-parallel saving splits each replicated array into one slice per device so the
        # hosts of a pod share the writing; within one process it only adds a sliced copy per
        # device and leaf (seconds per save for a ResNet on 8 CPU devices), so it is used only
        # across processes.
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(
                use_replica_parallel=jax.process_count() > 1)),
            (np.ndarray, ocp.type_handlers.NumpyHandler()),
            (np.number, ocp.type_handlers.ScalarHandler()),
            (int, ocp.type_handlers.ScalarHandler()),
            (float, ocp.type_handlers.ScalarHandler()),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Start saving `state` as `step` (returns before the write ends when async)."""
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._manager.save(int(step), args=ocp.args.PyTreeSave(state), metrics=metrics,
                           force=True)

    def _step_and_abstract(self, step: int | None, template: Any):
        """(step, or the latest; the template as ShapeDtypeStructs with its shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template)
        return step, abstract

    def restore(self, template: Any, step: int | None = None, *, partial: bool = False) -> Any:
        """The state saved at `step` (default: the latest), with the structure, shapes, dtypes
        and shardings of `template` (a state or its jax.eval_shape). IncompatibleCheckpointError
        when the saved state is of another model. partial=True: leaves saved but absent from
        the template are skipped (e.g. a template whose probe is None)."""
        step, abstract = self._step_and_abstract(step, template)
        try:
            return self._manager.restore(step, args=ocp.args.PyTreeRestore(
                abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial))
        except (ValueError, KeyError) as e:  # orbax: a tree or shape that does not match
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is of a different model "
                f"({first}); use a new workdir, or the config that wrote it") from e

    def restore_subtrees(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Only the named fields of the state saved at `step`: e.g. {"params": ...,
        "batch_stats": ...} for evaluation, without rebuilding the optimizer, queue or probe.

        template: field name -> a pytree of arrays or jax.ShapeDtypeStruct (with the shardings
        wanted). IncompatibleCheckpointError, naming the first parameter that differs, when the
        saved fields are of another model.
        """
        step, abstract = self._step_and_abstract(step, template)
        saved = self._manager.item_metadata(step)
        saved = getattr(saved, "tree", saved)
        want = {jax.tree_util.keystr(k): x.shape
                for k, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        have = {jax.tree_util.keystr(k): tuple(getattr(x, "shape", ()))
                for k, x in jax.tree_util.tree_flatten_with_path(
                    {name: saved.get(name) for name in template})[0]}
        for name, shape in want.items():
            if have.get(name) != tuple(shape):
                found = "absent" if name not in have else f"{have[name]}"
                raise IncompatibleCheckpointError(
                    f"the checkpoint at step {step} in {self.directory} is of a different model "
                    f"({name} is {found} there, {tuple(shape)} in this config); use the config "
                    "that wrote it")
        # A deeper network holds every leaf of a shallower one too: extra saved leaves in the
        # requested fields mean another model, not a subset to pick from.
        extra = sorted(set(have) - set(want))
        if extra:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is of a different model (it "
                f"has {extra[0]}, which this config lacks, and {len(extra) - 1} more); use the "
                "config that wrote it")
        return self._manager.restore(step, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))

    def wait(self) -> None:
        """Block until every pending asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
