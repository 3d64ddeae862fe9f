"""Checkpoints of the train state with orbax: asynchronous, atomic, the last few and the best.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment (even mid-write) leaves the previous complete checkpoint as the latest.
The data pipeline is stateless (see `jaxssl.data.pipeline`), so the train state alone is
enough to resume exactly.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxssl import files
from jaxssl.configuration import _one_line

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "DamagedCheckpointError",
           "CheckpointWriteError"]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in a workdir does not fit the state being restored."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint whose files cannot be read (truncated, corrupted, unreadable metadata): a
    fault of the storage, not another model; an older checkpoint may still restore."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, lost permissions or
    credentials). The message is one line: the step, why, and the newest complete checkpoint,
    which is intact."""


def _write_reason(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason where tensorstore or Python names an
    errno, else the error's first line."""
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    return _one_line(e)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a state, its abstract version or orbax's metadata of it, with paths
    written alike for all three (a dataclass field `.params` as a saved dict's `['params']`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = re.sub(r"\.([A-Za-z_]\w*)", r"['\1']", jax.tree_util.keystr(path))
        out[key] = tuple(getattr(leaf, "shape", None) or ())
    return out


def _first_difference(have: dict, want: dict, *, allow_extra: bool = False) -> str | None:
    """The first way the saved {path: shape} `have` differs from the wanted `want`, in words;
    None when they agree (saved leaves that are not wanted are ignored with allow_extra)."""
    for name, shape in want.items():
        if have.get(name) != shape:
            found = "absent" if name not in have else f"{have[name]}"
            return f"{name} is {found} there, {shape} in this config"
    # A deeper network holds every leaf of a shallower one too: extra saved leaves mean another
    # model, not a subset to pick from.
    extra = [] if allow_extra else sorted(set(have) - set(want))
    if extra:
        return (f"it has {extra[0]}, which this config lacks"
                + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return None


def _only(shapes: dict, fields, keep: bool) -> dict:
    """The entries of {path: shape} under the top-level `fields` (keep) or not under them."""
    prefixes = tuple(f"['{f}']" for f in fields)
    return {k: v for k, v in shapes.items() if k.startswith(prefixes) == keep}


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
        worst = float("-inf") if best_mode == "max" else float("inf")
        # A save without the metric (not an evaluation step) ranks last.
        rank = lambda metrics: (metrics or {}).get(best_metric, worst)  # noqa: E731
        if best_metric is not None:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=rank, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        self._best_metric = best_metric
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._saving: int | None = None  # the step of the newest save started
        self._failure: CheckpointWriteError | None = None
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
                # Orbax writes a step's metrics to disk only with a best_fn: without them a
                # new process (every resume) knows no best checkpoint and drops it.
                best_fn=rank if best_metric is not None else None, best_mode=best_mode,
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
        """Start saving `state` as `step` (returns before the write ends when async).
        CheckpointWriteError when this save, or the previous asynchronous one, failed."""
        self.wait()  # orbax waits for the save under way too: this names its step if it failed
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        if metrics is None and self._best_metric is not None:
            metrics = {}  # saved (and ranked last) so that every step has its metrics on disk
        self._saving = int(step)
        try:
            self._manager.save(int(step), args=ocp.args.PyTreeSave(state), metrics=metrics,
                               force=True)
        except Exception as e:
            raise self._failed(e) from e

    def failure(self) -> str | None:
        """Without blocking: the one-line message of a save that failed in the background (it
        stays reported), or None."""
        if self._failure is None:
            try:
                self._manager.check_for_errors()
            except Exception as e:
                self._failed(e)
        return None if self._failure is None else str(self._failure)

    def check(self) -> None:
        """CheckpointWriteError if a save has failed (without waiting for the one under way)."""
        if self.failure() is not None:
            raise self._failure

    def _failed(self, e: BaseException) -> CheckpointWriteError:
        if self._failure is None:
            done = self._complete_steps()
            kept = (f"the newest complete checkpoint, step {done[-1]}, is intact and a rerun "
                    "resumes from it" if done else "no complete checkpoint was written")
            self._failure = CheckpointWriteError(
                f"saving the checkpoint at step {self._saving} in {self.directory} failed: "
                f"{_write_reason(e)}; {kept}; free space (or lift the limit) and run the same "
                "command again")
            self._failure.__cause__ = e
        return self._failure

    def _complete_steps(self) -> list[int]:
        try:
            names = files.listdir(self.directory) if files.isdir(self.directory) else []
        except Exception:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _step_and_abstract(self, step: int | None, template: Any):
        """(step, or the latest; the template as ShapeDtypeStructs with its shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template)
        return step, abstract

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{path: shape} of the checkpoint at `step`, from its metadata alone;
        DamagedCheckpointError when that cannot be read."""
        try:
            saved = self._manager.item_metadata(step)
            saved = getattr(saved, "tree", saved)
            if not saved:
                raise ValueError("no metadata")
        except Exception as e:  # orbax/tensorstore/json errors: the files are not what it wrote
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is damaged (its metadata "
                f"cannot be read: {_one_line(e)})") from e
        return _leaf_shapes(saved)

    def saved_fields(self, step: int) -> set[str]:
        """The top-level fields of the state saved at `step` (from its metadata, a field saved
        as None included); DamagedCheckpointError when the metadata cannot be read."""
        try:
            saved = self._manager.item_metadata(step)
            saved = getattr(saved, "tree", saved)
            return set(saved) if isinstance(saved, dict) else set()
        except Exception as e:
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is damaged (its metadata "
                f"cannot be read: {_one_line(e)})") from e

    def difference(self, template: Any, step: int, *, ignore: str | None = None) -> str | None:
        """None when the checkpoint at `step` holds exactly the leaves of `template` (a state or
        its jax.eval_shape), with the same shapes; else the first difference, in words.
        ignore: a field (e.g. "probe") left out of the comparison on both sides. Reads the
        checkpoint's metadata only. DamagedCheckpointError when that cannot be read."""
        have, want = self._saved_shapes(step), _leaf_shapes(template)
        if ignore:
            have, want = _only(have, [ignore], False), _only(want, [ignore], False)
        return _first_difference(have, want)

    def restore(self, template: Any, step: int | None = None, *, partial: bool = False) -> Any:
        """The state saved at `step` (default: the latest), with the structure, shapes, dtypes
        and shardings of `template` (a state or its jax.eval_shape).

        IncompatibleCheckpointError when the saved state is of another model (its metadata
        names other leaves or shapes); DamagedCheckpointError when it is the same model but its
        files cannot be read. partial=True: leaves saved but absent from the template are
        skipped (e.g. a template whose probe is None)."""
        step, abstract = self._step_and_abstract(step, template)
        diff = _first_difference(self._saved_shapes(step), _leaf_shapes(abstract),
                                 allow_extra=partial)
        if diff:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is of a different model "
                f"({diff}); use a new workdir, or the config that wrote it")
        try:
            return self._manager.restore(step, args=ocp.args.PyTreeRestore(
                abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial))
        except Exception as e:  # the metadata matched: the data files are at fault
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is damaged "
                f"({_one_line(e)})") from e

    def restore_subtrees(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Only the named fields of the state saved at `step`: e.g. {"params": ...,
        "batch_stats": ...} for evaluation, without rebuilding the optimizer, queue or probe.

        template: field name -> a pytree of arrays or jax.ShapeDtypeStruct (with the shardings
        wanted). IncompatibleCheckpointError, naming the first parameter that differs, when the
        saved fields are of another model.
        """
        step, abstract = self._step_and_abstract(step, template)
        diff = _first_difference(_only(self._saved_shapes(step), template, True),
                                 _leaf_shapes(abstract))
        if diff:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} is of a different model "
                f"({diff}); use the config that wrote it")
        return self._manager.restore(step, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))

    def wait(self) -> None:
        """Block until every pending asynchronous save has been written; CheckpointWriteError
        if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        self.check()

    def close(self) -> None:
        """Wait for the saves under way and release the manager. A failed save is not raised
        here (close runs on the way out of errors; call wait() to learn of it)."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            self._failed(e)
        try:
            self._manager.close()
        except Exception as e:
            if self._failure is None:
                raise
            del e  # the write error already recorded explains it
