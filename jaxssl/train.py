"""The training loop: mesh, data, state, the compiled step, kNN monitor, checkpoints, logs.

`train(config, workdir)` runs (or resumes) one experiment. Everything that can be wrong with
the input (config values, dataset, batch vs devices, workdir, an old checkpoint of another
model) is checked before the first step and raised as `ConfigError` with a one-line message.

Resume is exact: the state is restored bitwise from the latest complete checkpoint, the data
pipeline is a pure function of (seed, step) and the step's randomness is fold_in(key, step).
Train metrics are logged as the values of the logged step itself (not a running mean, which a
restart would cut short), so a resumed run's metrics.jsonl equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, TextIO

import jax
import ml_collections

from jaxssl import configuration, distributed, experiment, files, methods, parallel
from jaxssl import state as state_lib
from jaxssl.checkpoint import CheckpointWriteError, Checkpointer, DamagedCheckpointError
from jaxssl.configuration import ConfigError
from jaxssl.data import pipeline, preview
from jaxssl.evaluate import diagnostics
from jaxssl.evaluate.features import EvaluationInterrupted, FeatureExtractor
from jaxssl.evaluate.knn import knn_top1
from jaxssl.lock import LOCK_NAME, WorkdirLock
from jaxssl.preemption import StopRequest
from jaxssl.writers import (MetricsLog, ProgressBar, WandbWriter, format_duration,
                            open_tensorboard, plot_curves, require_wandb)

__all__ = ["train", "RunResult", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class RunResult:
    status: str  # "done", "preempted" (SIGTERM/Ctrl-C) or "stopped" (stop_at_step)
    step: int
    total_steps: int
    knn_top1: float | None  # the last kNN evaluation
    knn_top1_init: float | None  # the same encoder at initialisation (step 0)
    state: Any = None  # the final TrainState (replicated over the mesh)


# What a jaxssl workdir holds from its first moments (the lock, then checkpoints/, then
# config.json).
_WORKDIR_MARKS = ("config.json", "checkpoints", LOCK_NAME)


def _prepare_workdir(workdir: str) -> str:
    workdir = files.resolve(workdir)
    try:
        present = files.listdir(workdir) if files.isdir(workdir) else []
    except Exception:  # unreadable: the write test below says why
        present = []
    # Another process's write test (below) may be under way: its probe is not a stranger's file.
    present = [p for p in present if not p.lstrip(".").startswith("write_test.")]
    if present and not any(m in present for m in _WORKDIR_MARKS):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ConfigError(f"workdir {workdir} is not empty ({shown}) and holds no jaxssl run "
                          "(no config.json or checkpoints/); pass a new or empty --workdir")
    probe = files.join(workdir, f".write_test.{os.getpid()}.{jax.process_index()}")
    try:
        files.makedirs(workdir)
        files.write_text(probe, "ok")
        files.remove(probe)
    except Exception as e:  # OSError locally; a remote store raises its own kinds
        hint = (" (gs:// needs TensorFlow or gcsfs installed, and credentials: "
                "gcloud auth application-default login)" if files.is_remote(workdir) else "")
        reason = getattr(e, "strerror", None) or configuration._one_line(e)
        raise ConfigError(f"cannot write to workdir {workdir} ({reason}){hint}; pass a "
                          "--workdir you can write to") from e
    return workdir


def _same_on_every_process(check):
    """check() on every process; a ConfigError on any of them is raised on all (the others
    would otherwise wait in their first collective for a process that has left). A collective:
    what every process read in check() was read before any of them goes on to write."""
    error = None
    try:
        result = check()
    except ConfigError as e:
        error = e
    failed = distributed.processes_where(error is not None)
    if error is not None:
        raise error
    if failed:
        raise ConfigError(
            f"process {', '.join(map(str, failed))} of {jax.process_count()} stopped before "
            "training (its error is in its own output; launch/local_multiprocess.sh writes it "
            "to LOGDIR/jaxssl_process_<i>.log): a workdir or config the processes do not see "
            "alike; give every process the same --workdir on a shared filesystem or bucket")
    return result


def _restore_newest(make_ckpt, state, workdir: str, say):
    """(start step, state, checkpointer): the newest checkpoint in the workdir that restores.

    A checkpoint of another model ends the run (ConfigError): older ones hold the same model.
    One whose online probe differs (eval.online_probe switched) restores the rest, the probe
    afresh. A damaged one (unreadable files) is moved to <workdir>/damaged_checkpoints/ with a
    note, and the one before it is tried; if none restores, ConfigError. No checkpoint: step 0.
    The checkpointer is closed when this raises.
    """
    ckpt = make_ckpt()
    damaged = []
    try:
        # Every process restores the same step: process 0's list (a shared filesystem with
        # attribute caching may show another process an older listing), and a checkpoint
        # damaged for any process is damaged for all.
        for step in distributed.from_process_0(sorted(ckpt.all_steps(), reverse=True)):
            try:
                error = None
                try:
                    diff = ckpt.difference(state, step)
                    # Written before jaxssl.methods: MoCo's key encoder and queue were fields
                    # of the state (saved as None by SimCLR, which compares equal above).
                    fields = ckpt.saved_fields(step)
                    old_layout = "method_state" not in fields and bool(
                        fields & set(state_lib.LEGACY_FIELDS))
                    legacy = state_lib.to_legacy(state) if old_layout else None
                    if legacy is not None and ckpt.difference(legacy, step) is None:
                        # The same values, moved to method_state.
                        restored = state_lib.from_legacy(ckpt.restore(legacy, step), state)
                        diff = None
                        say(f"note: the checkpoint at step {step} has the state layout of "
                            "jaxssl before its methods package; read and converted (the next "
                            "save writes the new layout)")
                    else:
                        legacy = None
                    probe_only = diff is not None and ckpt.difference(
                        state, step, ignore="probe") is None
                    if diff is None and legacy is None:
                        restored = ckpt.restore(state, step)
                    elif probe_only:
                        restored = ckpt.restore(state.replace(probe=None), step, partial=True)
                except DamagedCheckpointError as e:
                    error = e
                failed = distributed.processes_where(error is not None)
                if failed:
                    raise error or DamagedCheckpointError(
                        f"the checkpoint at step {step} in {ckpt.directory} cannot be read on "
                        f"process {', '.join(map(str, failed))}")
                if diff is None:
                    return step, restored, ckpt
                if not probe_only:
                    raise ConfigError(
                        f"the checkpoint at step {step} in {ckpt.directory} is of a different "
                        f"model ({diff}); use a new workdir, or the config that wrote it")
                # The online probe is turned on (or off) since the checkpoint: it never changed
                # the encoder, so everything else is restored and the probe starts afresh.
                say("note: the checkpoint's online probe does not match eval.online_probe; the "
                    "encoder resumes exactly, the probe " + (
                        "starts afresh" if state.probe is not None else "is dropped"))
                return step, restored.replace(probe=state.probe), ckpt
            except DamagedCheckpointError as e:
                damaged.append(step)
                aside = files.join(workdir, "damaged_checkpoints", f"{step}.{int(time.time())}")
                say(f"note: {e}; moved to {aside}; trying the checkpoint before it")
                ckpt.wait()
                if jax.process_index() == 0:
                    files.makedirs(files.dirname(aside))
                    files.move(files.join(ckpt.directory, str(step)), aside)
                distributed.barrier("jaxssl-damaged-checkpoint")
                ckpt.close()
                ckpt = make_ckpt()  # the manager lists its steps when made
        if damaged:
            raise ConfigError(
                f"no checkpoint in {ckpt.directory} could be restored (steps "
                f"{', '.join(map(str, damaged))} were damaged and are in "
                f"{files.join(workdir, 'damaged_checkpoints')}); to start afresh, use a new "
                "workdir")
    except ConfigError:
        ckpt.close()
        raise
    return 0, state, ckpt


# Fields that change how a run is watched, logged or checkpointed, not what it trains: they may
# differ on resume (the change is recorded). Every other field changes the result.
_FREE_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "checkpoint.",
                "eval.", "log.", "data.prefetch", "data.threads", "data.eval_path",
                "data.eval_split")


def _config_changes(config, workdir: str, n_dev: int, allow: bool) -> list[str] | None:
    """The fields in which `config` differs from the config.json that started this workdir
    (None for a new workdir). ConfigError, naming them, when one changes what is trained
    (or, with per-device BatchNorm, the device count does) unless `allow`."""
    path = files.join(workdir, "config.json")
    if not files.exists(path):
        return None
    old = _flatten(json.loads(files.read_text(path)))
    new = _flatten(json.loads(config.to_json_best_effort()))
    # A field added to jaxssl since the workdir started (absent from its config.json) that
    # keeps its default is no change: the run trained with what the default does.
    defaults = _flatten(json.loads(configuration.default_config().to_json_best_effort()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                     and not (k not in old and new.get(k) == defaults.get(k)))
    run_path = files.join(workdir, "run.json")
    if config.model.bn == "local" and files.exists(run_path):
        devices = json.loads(files.read_text(run_path)).get("devices")
        if devices not in (None, n_dev):
            old["devices"], new["devices"] = devices, n_dev  # one BatchNorm group per device
            changed.append("devices")
    # The groups of the methods that do not run are read by nothing, nor is the predictor's
    # width by a method without one.
    idle = tuple(f"{name}." for name in methods.METHODS if name != config.method)
    if not methods.get(config.method).predictor:
        idle += ("model.predictor_hidden_dims",)
    binding = [k for k in changed if not k.startswith(_FREE_FIELDS + idle)]
    if binding and not allow:
        shown = "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in binding[:4])
        more = f" and {len(binding) - 4} more" if len(binding) > 4 else ""
        raise ConfigError(
            f"the config differs from the one that started workdir {workdir} in what is "
            f"trained ({shown}{more}); use a new workdir, or pass --allow_config_change to "
            "continue with the change (recorded in config-<step>.json)")
    return changed


def _write_config(config, workdir: str, start: int, changed: list[str] | None, n_dev: int,
                  say) -> None:
    """config.json is written once, when the run starts; a resume with changed fields writes
    the config it continues with to config-<step>.json and says which fields changed."""
    text = json.dumps(json.loads(config.to_json_best_effort()), indent=2)
    if changed is None:
        files.write_text(files.join(workdir, "config.json"), text)
        files.write_text(files.join(workdir, "run.json"), json.dumps(
            {"devices": n_dev, "processes": jax.process_count()}, indent=2))
    elif changed:
        path = files.join(workdir, f"config-{start}.json")
        files.write_text(path, text)
        say(f"note: from step {start} the config differs from config.json in "
            f"{', '.join(changed)}; recorded in {path}")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _finite_values(step: int, metrics: dict, last_good: int | None, ckpt_dir: str) -> dict:
    """Metrics as floats; TrainingDiverged when any is not finite (the loss, the gradient norm,
    or the online probe's, whose state is checkpointed with the rest)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k in sorted(values) if not math.isfinite(values[k])]
    if bad:
        where = (f"the last good checkpoint is step {last_good} in {ckpt_dir} (rerunning "
                 "resumes from it)" if last_good is not None else "no checkpoint was saved")
        hint = ("try a lower eval.online_probe_lr, or eval.online_probe=false"
                if all(k.startswith("train/online_") for k in bad)
                else "try a lower optim.base_lr or a longer optim.warmup_epochs")
        first = "train/loss" if "train/loss" in bad else bad[0]
        raise TrainingDiverged(
            f"training stopped: non-finite {first} ({values[first]}) at step {step}; {where}; "
            f"{hint}")
    return values


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None,
          mesh=None, stream: TextIO | None = None, allow_config_change: bool = False) -> RunResult:
    """Train (or resume) the run of `config` in `workdir`; see the module docstring.

    stop_at_step: end this invocation after that step, with a checkpoint, as if preempted (a
    later call resumes). stream: where progress and messages go (default stdout).
    allow_config_change: resume although the config changes what is trained (ConfigError
    otherwise); the config continued with is recorded as config-<step>.json.
    """
    stream = stream or sys.stdout
    main = jax.process_index() == 0
    say = _Say(stream if main else None)

    configuration.validate(config)
    mesh = mesh or parallel.make_mesh()
    n_dev = mesh.shape[parallel.DATA_AXIS]
    lock = None

    def check_workdir():
        nonlocal lock
        if main and config.log.wandb_project:  # only process 0 talks to wandb
            require_wandb()
        path = _prepare_workdir(workdir)
        if main:  # before anything in the workdir is read or written
            lock = WorkdirLock(path)
            note = lock.acquire()
            if note:
                say(note)
        return path, _config_changes(config, path, n_dev, allow_config_change)

    # Until the first step, a SIGTERM ends the process at once: there is nothing to save.
    with StopRequest() as stop:
        stop.immediate = True
        stop.on_immediate_exit.append(lambda name: say(
            f"received {name} before the first step of this run: nothing new to save; run the "
            "same command again to continue"))
        stop.on_immediate_exit.append(lambda name: lock and lock.release())
        try:
            workdir, changed = _same_on_every_process(check_workdir)
            return _train(config, workdir, mesh, n_dev, changed, lock, stop, stop_at_step,
                          stream, say)
        finally:
            if lock is not None:
                lock.release()


def _train(config, workdir, mesh, n_dev, changed, lock, stop, stop_at_step, stream, say):
    """train() in a checked workdir this run holds the lock of."""
    main = jax.process_index() == 0
    exp = experiment.build(config, mesh, with_eval=config.eval.knn)
    d, m = config.data, config.model
    train_source, eval_source = exp.train_source, exp.eval_source
    steps_per_epoch, total_steps, schedule = exp.steps_per_epoch, exp.total_steps, exp.schedule
    train_step = experiment.compiled_step(exp)
    # Made by programs with no inputs whose outputs are laid out over the mesh: this works when
    # the mesh spans several processes, where device_put of a local value does not.
    replicated = parallel.replicated(mesh)
    state = jax.jit(lambda: experiment.initial_state(exp), out_shardings=replicated)()
    train_key = jax.jit(lambda: jax.random.fold_in(jax.random.key(config.seed), 1),
                        out_shardings=replicated)()
    if config.eval.online_probe and exp.probe_tx is None:
        say(f"note: the online probe is off: {train_source.name} has no labels")

    # Resume from the latest complete checkpoint, if any.
    ckpt_dir = files.join(workdir, "checkpoints")
    knn_on = config.eval.knn and eval_source is not None and train_source.labels is not None \
        and eval_source.labels is not None
    if knn_on and not getattr(train_source.reader, "random_access", True):
        knn_on = False
        say(f"note: the kNN monitor is off: {train_source.name} is streamed (no random access "
            f"to build its bank); prepare it as array_record (`tfds build --file_format="
            f"array_record`) or with `jaxssl prepare` for kNN")
    make_ckpt = lambda: Checkpointer(ckpt_dir, keep_last=config.checkpoint.keep,  # noqa: E731
                                     best_metric="eval/knn_top1" if knn_on else None,
                                     async_save=config.checkpoint.async_save)
    start, state, ckpt = _restore_newest(make_ckpt, state, workdir, say)
    if main:
        _write_config(config, workdir, start, changed, n_dev, say)
        # What evaluation and export need to know of the data without loading it again.
        files.write_text(files.join(workdir, "data.json"), json.dumps(
            {"name": train_source.name, "num_examples": train_source.num_examples,
             "mean": list(train_source.mean), "std": list(train_source.std),
             "class_names": list(train_source.class_names or []),
             "image_size": d.out_size}, indent=2))
    log = MetricsLog(files.join(workdir, "metrics.jsonl"))
    if main:
        log.truncate_after(start if start else -1)  # a fresh start keeps nothing, not step 0
    tb = open_tensorboard(files.join(workdir, "tensorboard")) if main else None
    if main and tb is None:
        say("note: no TensorBoard events: the tensorboard package is not installed "
            "(metrics.jsonl holds every logged value)")
    if tb and start:
        tb.restart(start + 1)

    # The kNN monitor: eval-mode backbone features of a labelled bank and query set. `stop`
    # (agreed by all processes) is asked between batches: EvaluationInterrupted ends it early.
    def evaluate_knn(st, stop) -> dict[str, float]:
        """{"eval/knn_top1", and the collapse measures of the query features:
        "eval/feature_std" (per-dimension std of the normalised features), "eval/rankme"}."""
        # The bank stays split over the devices, padded (a million features fit that way).
        bank = extract(st.params, st.batch_stats, train_source, bank_idx, padded=True, stop=stop)
        queries = extract(st.params, st.batch_stats, eval_source, query_idx, stop=stop)
        top1 = knn_top1(bank, train_source.labels[bank_idx], queries,
                        eval_source.labels[query_idx], num_classes=num_classes,
                        k=config.eval.knn_k, temperature=config.eval.knn_temperature,
                        mesh=mesh, bank_rows=len(bank_idx))
        health = jax.device_get(feature_health(queries))
        feature_dim[0] = queries.shape[1]
        return {"eval/knn_top1": top1, **{f"eval/{k}": float(v) for k, v in health.items()}}

    feature_dim = [0]  # of the features evaluate_knn saw last

    def warn_if_collapsed(n: int, scores: dict[str, float]) -> None:
        message = diagnostics.collapse_message(scores["eval/feature_std"], scores["eval/rankme"],
                                               feature_dim[0])
        if message:
            say(f"warning at step {n}: {message}")

    if knn_on:
        extract = FeatureExtractor(exp.apply_fn, mesh, mean=train_source.mean,
                                   std=train_source.std, size=d.out_size,
                                   batch_size=config.eval.batch_size, dtype=exp.dtype)
        bank_idx = experiment.subset(train_source.num_examples, config.eval.bank_examples,
                                     config.seed)
        query_idx = experiment.subset(eval_source.num_examples, config.eval.query_examples,
                                      config.seed)
        num_classes = exp.num_classes
        feature_health = jax.jit(diagnostics.feature_health)
    elif config.eval.knn:
        say("note: kNN evaluation is off: it needs labelled train and eval data "
            f"({d.source} gives none)")

    end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
    status, last_good, last_knn = "done", (start or None), None
    eval_due = lambda n: knn_on and (n % config.eval_every_steps == 0  # noqa: E731
                                     or n == total_steps)
    batches = bar = None
    # After the first step, a SIGTERM or Ctrl-C is a request, looked at after each step and
    # between the batches of every evaluation (a kNN pass over a large bank takes minutes; a
    # preempted TPU VM has about 30 s).
    stop_agreed = lambda: distributed.any_process(bool(stop))  # noqa: E731
    wb = None
    try:
        if config.log.wandb_project:  # process 0's, its refusal raised on every process
            wb = _same_on_every_process(lambda: main and WandbWriter(
                workdir, project=config.log.wandb_project, entity=config.log.wandb_entity,
                name=config.log.wandb_name, config=json.loads(config.to_json_best_effort()))
                or None)
        scalar_writers = [w for w in (tb, wb) if w is not None]
        # Before the first step a SIGTERM ends the process at once (StopRequest.immediate):
        # these evaluations need not look at it.
        if start:
            say(f"resuming from the checkpoint at step {start} of {total_steps} in "
                f"{ckpt_dir}")
            # A stop during the evaluation of step `start` saved that step without it:
            # evaluate it now, so the log reads as one uninterrupted run.
            missing = main and eval_due(start) and not any(
                r.get("step") == start and "eval/knn_top1" in r for r in log.read())
            if distributed.any_process(missing):
                scores = evaluate_knn(state, None)
                last_knn = scores["eval/knn_top1"]
                say(f"kNN top-1 at step {start} (its evaluation was interrupted): "
                    f"{last_knn:.4f}")
                if main:
                    log.update(start, scores)
                    for w in scalar_writers:
                        w.scalars(start, scores)
        else:
            say(f"training {m.encoder} (width {m.width}) with "
                f"{configuration.METHODS[config.method]} on {train_source.name}: "
                f"{total_steps} steps of batch {config.batch_size} ({steps_per_epoch} "
                f"steps/epoch) on {n_dev} {jax.devices()[0].platform} device(s); workdir "
                f"{workdir}")
            if main:
                picture = preview.write_preview(
                    files.join(workdir, "augment_preview.png"), train_source, exp.recipe,
                    d.out_size, seed=config.seed,
                    mode="device" if d.augment == "device" else "host",
                    image_size=d.image_size or None)
                if wb:
                    wb.image(0, "images/augment_preview", picture)
            if knn_on:
                t0 = time.perf_counter()
                scores = evaluate_knn(state, None)
                init_top1 = scores["eval/knn_top1"]
                say(f"kNN top-1 at initialisation: {init_top1:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
                if main:
                    log.write({"step": 0, "epoch": 0.0, **scores})
                    for w in scalar_writers:
                        w.scalars(0, {"epoch": 0.0, **scores})
        bar = ProgressBar(total_steps, config.batch_size, stream=stream) if main else None
        say.bar = bar
        batches = pipeline.make_pipeline(
            train_source, global_batch=config.batch_size, seed=config.seed, mode=d.augment,
            recipe=exp.recipe, out_size=d.out_size, start_step=start,
            num_steps=end - start, process_index=jax.process_index(),
            process_count=jax.process_count(), prefetch=d.prefetch,
            threads=d.threads or None, image_size=d.image_size or None)
        fields = experiment.batch_fields(exp)
        pending = None  # (step, metrics) of the newest step whose values are not yet checked
        values, rate = None, None
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, end):
            batch = next(batches)
            batch = parallel.host_to_global({f: batch[f] for f in fields}, mesh)
            state, metrics = train_step(state, batch, train_key)
            stop.immediate = False  # compiled and under way: from here a stop saves this step
            n = step + 1
            # Check the previous step while this one runs: one step of lag keeps the device
            # busy and still stops before a non-finite state is ever saved.
            if pending is not None:
                values = _finite_values(*pending, last_good, ckpt_dir)
            pending = (n, metrics)
            log_now = n % config.log_every_steps == 0 or n == total_steps
            eval_now = eval_due(n)
            # Read once (a signal may land at any line below), and agreed by every process:
            # a preemption notice on any of them makes all save this same step and exit.
            # A save that failed in the background ends the run now, not at the next save
            # (which may be thousands of steps later), on every process alike.
            failure = ckpt.failure()
            stopping, save_failed = distributed.any_process_each(bool(stop), failure is not None)
            if save_failed:
                raise CheckpointWriteError(failure or (
                    "saving a checkpoint failed on another process (its output says why); "
                    "the newest complete checkpoint is intact and a rerun resumes from it"))
            save_now = n % config.checkpoint_every_steps == 0 or n == end or stopping
            if n == start + 1 or log_now or eval_now or save_now:
                values = _finite_values(*pending, last_good, ckpt_dir)
                pending = None
            if n == start + 1:  # the first step compiled: time from here
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            evaluated = False
            if log_now or eval_now:
                elapsed = time.perf_counter() - window_start
                rate = config.batch_size * window_steps / elapsed if window_steps else rate
                record = {"step": n, "epoch": n / steps_per_epoch,
                          "train/lr": float(schedule(step)), **values}
                if rate:
                    record["train/images_per_sec"] = rate
                if eval_now and not stopping:
                    try:
                        scores = evaluate_knn(state, stop_agreed)
                        record.update(scores)
                        last_knn, evaluated = scores["eval/knn_top1"], True
                        warn_if_collapsed(n, scores)
                    except EvaluationInterrupted:
                        stopping = save_now = True  # saved without it; evaluated on resume
                if main:
                    log.write(record)
                    for w in scalar_writers:
                        w.scalars(n, {k: v for k, v in record.items() if k != "step"})
                    if evaluated or not bar.live:
                        say(_log_line(record, total_steps, config.batch_size))
            if save_now and distributed.any_process(lock is not None and lock.lost):
                raise ConfigError(
                    f"another run took over the lock of workdir {workdir} (this run's "
                    "heartbeat had stopped for longer than the lock's expiry: was it "
                    f"suspended?); stopping without saving step {n}, so as not to "
                    "overwrite that run's checkpoints")
            if save_now:
                ckpt.save(n, state, {"eval/knn_top1": last_knn} if evaluated else None)
                last_good = n
            if log_now or eval_now or save_now:
                window_start, window_steps = time.perf_counter(), 0
            if bar and values:
                # Between log steps, the rate of the current window (steps up to n - 1
                # are done: the lagged check above waited for them).
                live = time.perf_counter() - window_start
                live_rate = (config.batch_size * (window_steps - 1) / live
                             if window_steps > 1 and live > 0 else rate)
                bar.update(n, live_rate, values["train/loss"])
            if stopping:
                status = "preempted"
                ckpt.wait()
                what = stop.signal_name or "a stop request on another process"
                later = (" (its kNN evaluation runs when the run resumes)"
                         if eval_now and not evaluated else "")
                say(f"received {what}: saved a checkpoint at step {n} in "
                    f"{ckpt_dir}{later}; run the same command again to continue")
                break
        else:
            status = "stopped" if end < total_steps else "done"
        ckpt.wait()
    finally:
        if batches is not None:
            batches.close()
        ckpt.close()
        if tb:
            tb.close()
        if wb and sys.exc_info()[0] is not None:  # failed or interrupted: marked so in wandb
            wb.close(exit_code=1)
        if bar:
            bar.close()
    records = log.read() if main else []
    init = next((r["eval/knn_top1"] for r in records if r["step"] == 0 and "eval/knn_top1" in r),
                None)
    last = [r["eval/knn_top1"] for r in records if "eval/knn_top1" in r and r["step"] > 0]
    final_step = int(jax.device_get(state.step))
    curves = plot_curves(records, files.join(workdir, "curves.png")) if main else None
    if main and curves is None:
        say("note: curves.png not written: matplotlib is not installed")
    if wb:
        if curves:
            wb.image(final_step, "images/curves", curves)
        wb.close()
    result = RunResult(status, final_step, total_steps, last[-1] if last else None, init, state)
    if status == "done" and main:
        if result.knn_top1 is not None and init is not None:
            say(f"kNN top-1 on {eval_source.name} (k={config.eval.knn_k}): trained "
                f"{result.knn_top1:.4f}, at random initialisation {init:.4f}")
        say(f"done: {final_step} steps; outputs in {workdir}")
    return result


class _Say:
    """Print a message (process 0 only: the others are given no stream), above the progress
    bar once there is one."""

    def __init__(self, stream: TextIO | None):
        self.stream, self.bar = stream, None

    def __call__(self, text: str) -> None:
        if self.stream is None:
            return
        if self.bar is not None:
            self.bar.message(text)
        else:
            print(text, file=self.stream, flush=True)


def _log_line(record: dict[str, Any], total: int, batch: int) -> str:
    parts = [f"step {record['step']}/{total}"]
    if "train/loss" in record:
        parts.append(f"loss {record['train/loss']:.4f}")
        if "train/contrastive_top1" in record:  # the contrastive methods' own accuracy
            parts.append(f"top1 {record['train/contrastive_top1']:.3f}")
        parts.append(f"lr {record['train/lr']:.4g}")
    rate = record.get("train/images_per_sec")
    if rate:
        parts.append(f"{rate:,.0f} img/s")
        parts.append(f"ETA {format_duration((total - record['step']) * batch / rate)}")
    if "train/online_top1" in record:
        parts.append(f"probe top-1 {record['train/online_top1']:.3f}")
    if "eval/knn_top1" in record:
        parts.append(f"kNN top-1 {record['eval/knn_top1']:.4f}")
    return " | ".join(parts)
