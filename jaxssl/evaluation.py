"""Evaluations and export of a trained workdir: `jaxssl eval knn|linear|finetune|fewshot`,
`jaxssl export`.

Each reads the run's config (workdir/config.json, with command-line overrides) and a checkpoint
(the latest, or --step), runs on every device of the mesh, and writes its result to
workdir/eval/<kind>.json. The encoder is never changed in the workdir.

- knn: the trainer's monitor (same bank, queries, k and temperature, so the same number as
  eval/knn_top1 in metrics.jsonl at that step), plus top-5.
- linear: eval-mode features of the whole train split, computed once and kept on the devices,
  and a linear classifier trained on them (`jaxssl.evaluate.linear`); top-1/top-5 on the eval
  split.
- finetune: the backbone and a new linear classifier trained on a class-balanced fraction of
  the labels (`jaxssl.evaluate.finetune`); top-1/top-5 on the eval split.
- fewshot: closed-form ridge probes on 1, 5, 10 and 25 images per class (`eval.fewshot_shots`),
  the regulariser chosen on held-out train images, over several seeded draws
  (`jaxssl.evaluate.fewshot`); the mean and spread of the top-1 for each number of shots.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

import jax
import ml_collections
import numpy as np

from jaxssl import experiment, files, models, optim, parallel, state as state_lib
from jaxssl.configuration import ConfigError
from jaxssl.data import pipeline
from jaxssl.evaluate import fewshot as fewshot_lib
from jaxssl.evaluate import finetune as finetune_lib, linear as linear_lib
from jaxssl.evaluate.features import FeatureExtractor, eval_images
from jaxssl.evaluate.knn import knn_scores
from jaxssl.evaluate.topk import topk_correct

__all__ = ["KINDS", "evaluate", "export"]


def _topk(scores, labels, k: int, **kw) -> float:
    """Top-k accuracy of scores [n, C] (ties broken as argmax does; see evaluate.topk)."""
    return float(np.mean(np.asarray(topk_correct(scores, labels, k, **kw)), dtype=np.float64))


def _extractor(exp, apply_fn=None, output="features", augment_fn=None) -> FeatureExtractor:
    c = exp.config
    return FeatureExtractor(apply_fn or exp.apply_fn, exp.mesh, mean=exp.train_source.mean,
                            std=exp.train_source.std, size=c.data.out_size,
                            batch_size=c.eval.batch_size, dtype=exp.dtype, output=output,
                            augment_fn=augment_fn, seed=c.seed)


def _knn(exp, params, batch_stats, say) -> dict[str, Any]:
    c, train, test = exp.config, exp.train_source, exp.eval_source
    extract = _extractor(exp)
    bank_idx = experiment.subset(train.num_examples, c.eval.bank_examples, c.seed)
    query_idx = experiment.subset(test.num_examples, c.eval.query_examples, c.seed)
    bank = extract(params, batch_stats, train, bank_idx, padded=True)  # split over the devices
    queries = extract(params, batch_stats, test, query_idx)
    scores = knn_scores(bank, train.labels[bank_idx], queries, num_classes=exp.num_classes,
                        k=c.eval.knn_k, temperature=c.eval.knn_temperature, mesh=exp.mesh,
                        bank_rows=len(bank_idx))
    y = test.labels[query_idx]
    # A class no neighbour voted for (score 0) is never a hit, even in a top-5 of fewer votes.
    return {"top1": _topk(scores, y, 1, require_positive=True),
            "top5": _topk(scores, y, 5, require_positive=True),
            "settings": {"k": c.eval.knn_k, "temperature": c.eval.knn_temperature,
                         "bank_examples": len(bank_idx), "query_examples": len(query_idx)}}


def _linear(exp, params, batch_stats, say) -> dict[str, Any]:
    c, e, train, test = exp.config, exp.config.eval, exp.train_source, exp.eval_source
    extract = _extractor(exp)
    t0 = time.perf_counter()
    copies = e.linear_augment_copies
    if copies:
        # K random crop + flip views of every train image (row p = image p mod N, view p // N).
        augment = finetune_lib.finetune_augment(c.data.out_size, train.mean, train.std,
                                                e.finetune_crop_scale, exp.dtype)
        rows = np.tile(np.arange(train.num_examples), copies)
        train_extract = _extractor(exp, augment_fn=augment)
    else:
        rows, train_extract = np.arange(train.num_examples), extract
    # Split over the devices, zero-padded: no device holds the whole train split's features.
    train_features = train_extract(params, batch_stats, train, rows, padded=True)
    train_labels = train.labels[rows]
    test_features = extract(params, batch_stats, test, np.arange(test.num_examples))
    epochs = max(1, round(e.linear_epochs / copies)) if copies else e.linear_epochs
    say(f"features of {len(rows)} train {'views' if copies else 'images'} and "
        f"{test.num_examples} eval images ({train_features.shape[1]}-d) in "
        f"{time.perf_counter() - t0:.0f} s; training the classifier for {epochs} epochs")
    lr = optim.scale_learning_rate(e.linear_lr, e.linear_batch_size, "linear")
    history = []

    def progress(epoch, metrics):
        history.append({"epoch": epoch + 1, **metrics})
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            say(f"epoch {epoch + 1}/{epochs}: train loss {metrics['loss']:.4f}, "
                f"top-1 {metrics['top1']:.4f}")

    classifier = linear_lib.train_linear_classifier(
        train_features, train_labels, num_classes=exp.num_classes, epochs=epochs,
        batch_size=e.linear_batch_size, learning_rate=lr, optimizer=e.linear_optimizer,
        standardize=e.linear_standardize, seed=c.seed, mesh=exp.mesh,
        num_rows=len(rows), callback=progress)
    metrics = linear_lib.evaluate_linear_classifier(classifier, test_features, test.labels,
                                                    mesh=exp.mesh)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            # Of the last epoch's batches, each before its update (no second pass over the
            # train features).
            "train_top1": history[-1]["top1"], "train_history": history,
            "settings": {"epochs": epochs, "batch_size": e.linear_batch_size,
                         "learning_rate": lr, "optimizer": e.linear_optimizer,
                         "standardize": e.linear_standardize, "augment_copies": copies,
                         "crop_scale": list(e.finetune_crop_scale) if copies else None,
                         "train_examples": train.num_examples}}


def _finetune(exp, params, batch_stats, say) -> dict[str, Any]:
    c, e, mesh, train, test = exp.config, exp.config.eval, exp.mesh, exp.train_source, \
        exp.eval_source
    n_dev, size = mesh.shape[parallel.DATA_AXIS], c.data.out_size
    idx = finetune_lib.label_fraction(train.labels, e.finetune_fraction, c.seed)
    unit = n_dev * jax.process_count() // np.gcd(n_dev, jax.process_count())
    # The batch that splits the subset into as many steps as eval.finetune_batch_size would,
    # evenly: an epoch then sees (nearly) every labelled image, not floor(n / batch) batches.
    per_epoch = -(-len(idx) // e.finetune_batch_size)
    batch = len(idx) // per_epoch // unit * unit
    if batch == 0:
        raise ConfigError(f"{len(idx)} labelled examples cannot fill a batch on {n_dev} devices; "
                          "raise eval.finetune_fraction")
    # In memory, the labelled subset is taken as uint8 from the images; from files or records
    # (10% of ImageNet would be 19 GB at 224 px), each step reads and decodes its rows only,
    # a few steps ahead on a thread.
    images = train.images[idx] if train.images is not None else None
    labels = train.labels[idx].astype(np.int32)
    plan = pipeline.BatchPlan(len(idx), batch, c.seed, jax.process_index(), jax.process_count())
    total = e.finetune_epochs * plan.steps_per_epoch
    lr = optim.scale_learning_rate(e.finetune_lr, batch, "linear")
    tx = optim.make_optimizer("sgd", optim.warmup_cosine_schedule(lr, 0, total),
                              weight_decay=e.finetune_weight_decay, momentum=0.9, nesterov=True)
    model = finetune_lib.Classifier(backbone=exp.model.backbone, num_classes=exp.num_classes)
    init_params, _ = models.init_variables(model, jax.random.key(c.seed, impl="rbg"),
                                           (1, size, size, 3), jit=True)
    replicated = parallel.replicated(mesh)
    start = {"backbone": params["backbone"],
             "classifier": parallel.put_global(init_params["classifier"], replicated)}
    apply_fn = models.flax_apply_fn(model)
    # Built by a program over the restored (mesh-wide) arrays: it works when the mesh spans
    # several processes, where device_put of a local value does not.
    state = jax.jit(lambda p, bs: state_lib.create_train_state(p, {"backbone": bs}, tx),
                    out_shardings=replicated)(start, batch_stats["backbone"])
    step_fn = parallel.compile_step(functools.partial(
        finetune_lib.finetune_step, apply_fn=apply_fn, tx=tx,
        augment_fn=finetune_lib.finetune_augment(size, train.mean, train.std,
                                                 e.finetune_crop_scale, exp.dtype),
        average_batch_stats=parallel.BN_MODES[c.model.bn].average_batch_stats), mesh)
    key = jax.jit(lambda: jax.random.fold_in(jax.random.key(c.seed), 3),
                  out_shardings=replicated)()
    say(f"fine-tuning on {len(idx)} labelled images ({e.finetune_fraction:g} of "
        f"{train.num_examples}, class-balanced): {total} steps of batch {batch}")
    history = []

    def batches():
        for step in range(total):
            rows = plan.indices(step)
            yield {"images": images[rows] if images is not None else
                   eval_images(train, idx[rows], size), "labels": labels[rows]}

    for step, rows in enumerate(pipeline._prefetch(batches(), 2)):
        state, metrics = step_fn(state, parallel.host_to_global(rows, mesh), key)
        if (step + 1) % plan.steps_per_epoch == 0:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(values["train/loss"]):
                raise ConfigError(f"fine-tuning diverged (loss {values['train/loss']}) at step "
                                  f"{step + 1}; lower eval.finetune_lr")
            epoch = (step + 1) // plan.steps_per_epoch
            history.append({"epoch": epoch, **values})
            if epoch % max(1, e.finetune_epochs // 10) == 0 or epoch == e.finetune_epochs:
                say(f"epoch {epoch}/{e.finetune_epochs}: train loss {values['train/loss']:.4f}, "
                    f"top-1 {values['train/top1']:.4f}")
    logits = _extractor(exp, apply_fn, "logits")(state.params, state.batch_stats, test,
                                                  np.arange(test.num_examples))
    scores = parallel.to_host(logits)
    return {"top1": _topk(scores, test.labels, 1), "top5": _topk(scores, test.labels, 5),
            "train_history": history,
            "settings": {"fraction": e.finetune_fraction, "labelled_examples": int(len(idx)),
                         "epochs": e.finetune_epochs, "steps": total,
                         "batch_size": batch, "learning_rate": lr,
                         "weight_decay": e.finetune_weight_decay,
                         "crop_scale": list(e.finetune_crop_scale)}}


def _fewshot(exp, params, batch_stats, say) -> dict[str, Any]:
    c, e, train, test = exp.config, exp.config.eval, exp.train_source, exp.eval_source
    shots = sorted({int(k) for k in e.fewshot_shots})
    most, held = shots[-1], e.fewshot_val_per_class
    try:
        plans = [fewshot_lib.draw(train.labels, most + held, exp.num_classes, c.seed + d)
                 for d in range(e.fewshot_draws)]
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # Only the drawn train images are encoded (a few per class), and the whole eval split.
    rows = np.unique(np.concatenate([p.ravel() for p in plans]))
    extract = _extractor(exp)
    t0 = time.perf_counter()
    train_features = parallel.to_host(extract(params, batch_stats, train, rows))
    test_features = parallel.to_host(extract(params, batch_stats, test,
                                             np.arange(test.num_examples)))
    say(f"features of {len(rows)} train and {test.num_examples} eval images in "
        f"{time.perf_counter() - t0:.0f} s; ridge probes of {', '.join(map(str, shots))} shots, "
        f"{e.fewshot_draws} draws each")

    def features(idx):
        return train_features[np.searchsorted(rows, idx)]

    per_shot = {}
    for k in shots:
        runs = []
        for plan in plans:
            fit, val = plan[:, :k].ravel(), plan[:, most:].ravel()
            runs.append(fewshot_lib.probe(features(fit), train.labels[fit], features(val),
                                          train.labels[val], test_features, test.labels,
                                          exp.num_classes))
        top1 = [r["top1"] for r in runs]
        per_shot[str(k)] = {"top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1)),
                            "top5_mean": float(np.mean([r["top5"] for r in runs])),
                            "top1": top1, "lambda": [r["lambda"] for r in runs],
                            "val_top1": [r["val_top1"] for r in runs]}
        say(f"{k}-shot: top-1 {np.mean(top1):.4f} +- {np.std(top1):.4f} over "
            f"{len(runs)} draws")
    last = per_shot[str(most)]
    return {"top1": last["top1_mean"], "top5": last["top5_mean"], "shots": per_shot,
            "settings": {"shots": shots, "draws": e.fewshot_draws, "val_per_class": held,
                         "lambdas": list(fewshot_lib.LAMBDAS),
                         "eval_examples": test.num_examples}}


# kind -> fn(experiment, params, batch_stats, say) -> results with "top1", "top5", "settings".
KINDS: dict[str, Callable] = {"knn": _knn, "linear": _linear, "finetune": _finetune,
                              "fewshot": _fewshot}


def _write_json(path: str, record: dict) -> None:
    """Atomically (a crash leaves the previous file or the new one), local or remote."""
    files.makedirs(files.dirname(path))
    files.write_text(path, json.dumps(
        record, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def evaluate(kind: str, config: ml_collections.ConfigDict, workdir: str, *,
             step: int | None = None, mesh=None, stream: TextIO | None = None) -> dict[str, Any]:
    """Run evaluation `kind` (a key of KINDS) of the checkpoint at `step` (default: the latest)
    in `workdir`; write workdir/eval/<kind>.json and return its record."""
    stream = stream or sys.stdout
    main = jax.process_index() == 0

    def say(text: str) -> None:
        if main:
            print(text, file=stream, flush=True)

    if kind not in KINDS:
        raise ConfigError(f"unknown evaluation {kind!r}; choose one of {', '.join(KINDS)}")
    mesh = mesh or parallel.make_mesh()
    workdir = files.resolve(workdir)
    exp = experiment.build(config, mesh, with_eval=True, training=False)
    if exp.num_classes is None or exp.eval_source is None or exp.eval_source.labels is None:
        raise ConfigError(f"eval {kind} needs labelled train and eval splits; "
                          f"{exp.train_source.name} has none (set data.eval_split or "
                          "data.eval_path)")
    params, batch_stats, step = experiment.restore_encoder(
        exp.model, mesh, workdir, step, image_size=config.data.out_size)
    say(f"eval {kind}: {config.model.encoder} at step {step} of {workdir} on "
        f"{exp.train_source.name} ({mesh.shape[parallel.DATA_AXIS]} "
        f"{jax.devices()[0].platform} device(s))")
    t0 = time.perf_counter()
    result = KINDS[kind](exp, params, batch_stats, say)
    record = {"kind": kind, "step": step, "workdir": workdir, "dataset": exp.train_source.name,
              "eval_dataset": exp.eval_source.name, **result,
              "seconds": round(time.perf_counter() - t0, 1),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = files.join(workdir, "eval", f"{kind}.json")
    if main:
        _write_json(path, record)  # the newest evaluation of this kind
        _write_json(files.join(workdir, "eval", f"{kind}_step{step}.json"), record)
        say(f"{kind} top-1 {record['top1']:.4f}, top-5 {record['top5']:.4f} "
            f"({record['seconds']:.0f} s); written to {path}")
    return record


def export(config: ml_collections.ConfigDict, workdir: str, output: str, *, fmt: str,
           step: int | None = None, stream: TextIO | None = None) -> str:
    """Write the backbone of the checkpoint at `step` (default: the latest) to `output` as
    `fmt` (a key of `jaxssl.export.FORMATS`); returns the absolute output path."""
    from jaxssl import export as export_lib

    stream = stream or sys.stdout
    if fmt not in export_lib.FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of "
                          f"{', '.join(export_lib.FORMATS)}")
    workdir, output = files.resolve(workdir), files.resolve(output)
    if not files.is_remote(output) and not os.path.isdir(os.path.dirname(output)):
        raise ConfigError(f"the folder of --output {output} does not exist; create it first")
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    model, _ = experiment.build_model(config)
    params, batch_stats, step = experiment.restore_encoder(
        model, mesh, workdir, step, image_size=config.data.out_size)
    m = config.model
    metadata = {"encoder": m.encoder, "width": str(m.width), "cifar_stem": str(m.cifar_stem),
                "step": str(step), "image_size": str(config.data.out_size),
                "method": config.method}
    data_json = files.join(workdir, "data.json")
    if files.isfile(data_json):  # the normalisation the backbone was trained with
        data = json.loads(files.read_text(data_json))
        metadata.update(dataset=str(data["name"]), mean=json.dumps(data["mean"]),
                        std=json.dumps(data["std"]))
    else:
        print(f"note: {workdir} has no data.json (trained by an older jaxssl): the export's "
              "metadata lacks the normalisation mean/std", file=stream, flush=True)
    if jax.process_index() == 0:
        try:
            export_lib.export_backbone(output, jax.device_get(params), jax.device_get(batch_stats),
                                       format=fmt, metadata=metadata)
        except (TypeError, ValueError):
            raise  # jaxssl's own mistake, not the output's
        except Exception as e:  # OSError locally; a remote store raises its own kinds
            raise ConfigError(f"cannot write --output {output}: "
                              f"{getattr(e, 'strerror', None) or e}") from e
        note = "" if m.width == 64 or fmt != "safetensors" else (
            f"; width {m.width} is not torchvision's 64: build a ResNet of that width to load it")
        print(f"exported the {m.encoder} backbone at step {step} of {workdir} to {output} "
              f"({fmt}){note}", file=stream, flush=True)
    return output
