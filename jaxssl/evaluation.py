"""Evaluations and export of a trained workdir: `jaxssl eval knn|linear|finetune|fewshot|embed`,
`jaxssl export`.

Each reads the run's config (workdir/config.json, with command-line overrides) and a checkpoint
(the latest, or --step), runs on every device of the mesh, and writes its result to
workdir/eval/<kind>.json. The encoder is never changed in the workdir. The eval-mode features
a kind needs come from `Features`: kept in workdir/eval/features-<step>/ by the first
evaluation of a checkpoint that computes them and read by the next ones (`evaluate.cache`).

- knn: the trainer's monitor (same bank, queries, k and temperature, so the same number as
  eval/knn_top1 in metrics.jsonl at that step), plus top-5.
- linear: eval-mode features of the whole train split, kept on the devices, and a linear
  classifier trained on them (`jaxssl.evaluate.linear`); top-1/top-5 on the eval split. With
  eval.linear_lr a list, one classifier per learning rate in one vmapped program, on the train
  split less a held-out eval.linear_val_fraction, which chooses the one reported.
- finetune: the backbone and a new linear classifier trained on a class-balanced fraction of
  the labels (`jaxssl.evaluate.finetune`); top-1/top-5 on the eval split.
- fewshot: closed-form ridge probes on 1, 5, 10 and 25 images per class (`eval.fewshot_shots`),
  the regulariser chosen on held-out train images, over several seeded draws
  (`jaxssl.evaluate.fewshot`); the mean and spread of the top-1 for each number of shots.
- embed: eval/embed_map.png, a 2-D map (UMAP, or PCA) of eval images' features coloured by
  class, and eval/embed_retrieval.png, seeded eval queries with their nearest train images
  (`jaxssl.evaluate.embed`); top-1 is the nearest neighbour's class of those queries.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

import jax
import ml_collections
import numpy as np

from jaxssl import configuration, experiment, files, models, optim, parallel, state as state_lib
from jaxssl.configuration import ConfigError
from jaxssl.data import pipeline
from jaxssl.evaluate import cache as cache_lib, embed as embed_lib, fewshot as fewshot_lib
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


def _place_rows(host: np.ndarray, mesh, padded: bool) -> jax.Array:
    """Host features [n, F] on the mesh as FeatureExtractor returns them: padded, [R, F] with
    zero rows up to a multiple of the devices, split over DATA_AXIS; otherwise split when n
    divides evenly and replicated when not. Each device's rows are read from `host` (which may
    be a memory map) on their own: the whole array is never copied."""
    n, dim = host.shape
    n_dev = mesh.shape[parallel.DATA_AXIS]
    rows = -(-n // n_dev) * n_dev if padded else n
    sharding = (parallel.data_sharded(mesh) if padded or n % n_dev == 0
                else parallel.replicated(mesh))

    def shard(index):
        start, stop, _ = index[0].indices(rows)
        out = np.zeros((stop - start, dim), np.float32)
        out[:max(0, min(stop, n) - start)] = host[start:min(stop, n)]
        return out[:, index[1]]

    return jax.make_array_from_callback((rows, dim), sharding, shard)


class Features:
    """Eval-mode backbone features of the restored checkpoint on the train or eval split.

    With eval.feature_cache (and one process), through `jaxssl.evaluate.cache.FeatureCache` in
    WORKDIR/eval/features-<step>/: rows computed by an earlier evaluation of this checkpoint are
    read, the others encoded and added. Without it, encoded every time.
    """

    def __init__(self, exp, params, batch_stats, workdir: str, step: int, say):
        self.exp, self.params, self.batch_stats = exp, params, batch_stats
        self.workdir, self.step = workdir, step
        self.extract = _extractor(exp)
        self.sources = {"train": exp.train_source, "eval": exp.eval_source}
        self.cache = None
        if exp.config.eval.feature_cache and jax.process_count() == 1:
            key, what = cache_lib.fingerprint(exp.config, params, batch_stats, self.sources)
            self.cache = cache_lib.FeatureCache(
                files.join(workdir, "eval", f"features-{step}"), key, what, say=say)

    def _compute(self, split: str, rows) -> jax.Array:
        return self.extract(self.params, self.batch_stats, self.sources[split], rows,
                            padded=True)

    def host(self, split: str, rows) -> np.ndarray:
        """float32 [len(rows), F] on the host (a memory map of the cache when it can be)."""
        rows = np.asarray(rows)
        if self.cache is None:
            return parallel.to_host(self._compute(split, rows))[:len(rows)]
        return self.cache.rows(
            split, rows, lambda missing: parallel.to_host(self._compute(split, missing))[
                :len(missing)])

    def __call__(self, split: str, rows, *, padded: bool = False) -> jax.Array:
        """As FeatureExtractor(...)(params, batch_stats, source, rows, padded=padded)."""
        if self.cache is None:
            return self.extract(self.params, self.batch_stats, self.sources[split], rows,
                                padded=padded)
        return _place_rows(self.host(split, rows), self.exp.mesh, padded)


def _knn(exp, params, batch_stats, say, features) -> dict[str, Any]:
    c, train, test = exp.config, exp.train_source, exp.eval_source
    bank_idx = experiment.subset(train.num_examples, c.eval.bank_examples, c.seed)
    query_idx = experiment.subset(test.num_examples, c.eval.query_examples, c.seed)
    bank = features("train", bank_idx, padded=True)  # split over the devices
    queries = features("eval", query_idx)
    scores = knn_scores(bank, train.labels[bank_idx], queries, num_classes=exp.num_classes,
                        k=c.eval.knn_k, temperature=c.eval.knn_temperature, mesh=exp.mesh,
                        bank_rows=len(bank_idx))
    y = test.labels[query_idx]
    # A class no neighbour voted for (score 0) is never a hit, even in a top-5 of fewer votes.
    return {"top1": _topk(scores, y, 1, require_positive=True),
            "top5": _topk(scores, y, 5, require_positive=True),
            "settings": {"k": c.eval.knn_k, "temperature": c.eval.knn_temperature,
                         "bank_examples": len(bank_idx), "query_examples": len(query_idx)}}


def _linear(exp, params, batch_stats, say, features) -> dict[str, Any]:
    c, e, train, test = exp.config, exp.config.eval, exp.train_source, exp.eval_source
    t0 = time.perf_counter()
    copies = e.linear_augment_copies
    sweep = configuration.linear_learning_rates(e.linear_lr)
    images = np.arange(train.num_examples)
    held_out = None
    if sweep:
        # The learning rate is chosen on train images the classifiers never see, never on
        # the eval split: a seeded eval.linear_val_fraction of the train split is held out.
        held = max(1, round(e.linear_val_fraction * train.num_examples))
        held_out = experiment.subset(train.num_examples, held, c.seed + 1)
        images = np.setdiff1d(images, held_out)
    if copies:
        # K random crop + flip views of every train image (row p = image images[p mod N'],
        # view p // N'). Random views are not cached.
        augment = finetune_lib.finetune_augment(c.data.out_size, train.mean, train.std,
                                                e.finetune_crop_scale, exp.dtype)
        rows = np.tile(images, copies)
        train_features = _extractor(exp, augment_fn=augment)(params, batch_stats, train, rows,
                                                             padded=True)
    else:
        rows = images
        # Split over the devices, zero-padded: no device holds the whole train split's features.
        train_features = features("train", rows, padded=True)
    train_labels = train.labels[rows]
    test_features = features("eval", np.arange(test.num_examples))
    val_features = None if held_out is None else features("train", held_out)
    epochs = max(1, round(e.linear_epochs / copies)) if copies else e.linear_epochs
    lrs = [optim.scale_learning_rate(lr, e.linear_batch_size, "linear")
           for lr in (sweep or (e.linear_lr,))]
    say(f"features of {len(rows)} train {'views' if copies else 'images'} and "
        f"{test.num_examples} eval images ({train_features.shape[1]}-d) in "
        f"{time.perf_counter() - t0:.0f} s; training "
        + (f"{len(lrs)} classifiers at once (learning rates {', '.join(f'{v:g}' for v in lrs)};"
           f" {len(held_out)} train images held out to choose one)" if sweep
           else "the classifier") + f" for {epochs} epochs")
    history = []

    def progress(epoch, metrics):
        history.append({"epoch": epoch + 1, **metrics})
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            if sweep:
                say(f"epoch {epoch + 1}/{epochs}: train loss "
                    f"{', '.join(f'{v:.4f}' for v in metrics['loss'])}")
            else:
                say(f"epoch {epoch + 1}/{epochs}: train loss {metrics['loss']:.4f}, "
                    f"top-1 {metrics['top1']:.4f}")

    classifiers = linear_lib.train_linear_classifier(
        train_features, train_labels, num_classes=exp.num_classes, epochs=epochs,
        batch_size=e.linear_batch_size, learning_rate=lrs if sweep else lrs[0],
        optimizer=e.linear_optimizer, standardize=e.linear_standardize, seed=c.seed,
        mesh=exp.mesh, num_rows=len(rows), callback=progress)
    chosen, trials = 0, None
    if sweep:
        trials = []
        for i, classifier in enumerate(classifiers):
            val = linear_lib.evaluate_linear_classifier(classifier, val_features,
                                                        train.labels[held_out], mesh=exp.mesh)
            trials.append({"learning_rate": lrs[i], "base_lr": sweep[i],
                           "val_top1": val["top1"], "val_loss": val["loss"],
                           "train_top1": history[-1]["top1"][i]})
        # The best held-out top-1; a tie goes to the lower held-out loss.
        chosen = max(range(len(trials)),
                     key=lambda i: (trials[i]["val_top1"], -trials[i]["val_loss"]))
        for t in trials:
            say(f"learning rate {t['learning_rate']:g}: held-out top-1 {t['val_top1']:.4f}"
                f"{'  <- chosen' if t is trials[chosen] else ''}")
        classifier = classifiers[chosen]
    else:
        classifier = classifiers
    metrics = linear_lib.evaluate_linear_classifier(classifier, test_features, test.labels,
                                                    mesh=exp.mesh)
    train_top1 = history[-1]["top1"][chosen] if sweep else history[-1]["top1"]
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            # Of the last epoch's batches, each before its update (no second pass over the
            # train features).
            "train_top1": train_top1, "train_history": history,
            **({"sweep": trials, "val_top1": trials[chosen]["val_top1"]} if sweep else {}),
            "settings": {"epochs": epochs, "batch_size": e.linear_batch_size,
                         "learning_rate": lrs[chosen], "optimizer": e.linear_optimizer,
                         "standardize": e.linear_standardize, "augment_copies": copies,
                         "crop_scale": list(e.finetune_crop_scale) if copies else None,
                         "train_examples": int(len(images)),
                         "held_out_examples": 0 if held_out is None else int(len(held_out))}}


def _finetune(exp, params, batch_stats, say, features) -> dict[str, Any]:
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


def _fewshot(exp, params, batch_stats, say, features) -> dict[str, Any]:
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
    t0 = time.perf_counter()
    train_features = features.host("train", rows)
    test_features = features.host("eval", np.arange(test.num_examples))
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


def _write_picture(draw, path: str) -> str:
    """draw(file) writes a PNG to a file object; it lands at `path`, local or remote, whole."""
    buffer = io.BytesIO()
    draw(buffer)
    files.write_bytes(path, buffer.getvalue())
    return path


def _embed(exp, params, batch_stats, say, features) -> dict[str, Any]:
    c, e, train, test = exp.config, exp.config.eval, exp.train_source, exp.eval_source
    folder = files.join(features.workdir, "eval")
    t0 = time.perf_counter()
    points = experiment.subset(test.num_examples, e.embed_points, c.seed)
    xy, method = embed_lib.project_2d(features.host("eval", points),
                                      "auto" if e.embed_method == "auto" else e.embed_method,
                                      seed=c.seed)
    tag = f"{c.model.encoder}, {c.method}, step {features.step}"
    what = f"{method.upper()} of the backbone features of {len(points)} {test.name} images"
    names = train.class_names
    main = jax.process_index() == 0
    map_path = files.join(folder, "embed_map.png")
    if main:
        files.makedirs(folder)
        _write_picture(lambda f: embed_lib.plot_map(xy, test.labels[points], names, f,
                                                    title=f"{what} ({tag})"), map_path)
    say(f"{what} in {time.perf_counter() - t0:.0f} s: {map_path}")
    # Queries: a seeded draw of eval images; the bank: every train image.
    queries = np.sort(np.random.default_rng(c.seed).choice(
        test.num_examples, min(e.embed_queries, test.num_examples), replace=False))
    k = min(e.embed_neighbours, train.num_examples)
    neighbours, sims = embed_lib.nearest(features.host("eval", queries),
                                         features.host("train", np.arange(train.num_examples)), k)
    q_labels, n_labels = test.labels[queries], train.labels[neighbours]
    size = c.data.out_size
    grid_path = files.join(folder, "embed_retrieval.png")
    if main:
        q_images = eval_images(test, queries, size)
        n_images = eval_images(train, neighbours.ravel(), size).reshape(
            neighbours.shape + (size, size, 3))
        _write_picture(lambda f: embed_lib.plot_retrieval(
            q_images, q_labels, n_images, n_labels, sims, names, f,
            title=f"{len(queries)} {test.name} images and their {k} nearest of "
                  f"{train.num_examples} {train.name} images by cosine similarity ({tag}); "
                  "red: another class"), grid_path)
    precision = float(np.mean(n_labels == q_labels[:, None]))
    say(f"retrieval grid of {len(queries)} queries x {k} neighbours: {grid_path}")
    return {"top1": float(np.mean(n_labels[:, 0] == q_labels)), "precision_at_k": precision,
            "summary": f"embed: {method} map of {len(points)} points, {len(queries)} queries "
                       f"whose {k} nearest neighbours share their class {precision:.0%} of the "
                       "time",
            "map": map_path, "retrieval": grid_path, "method": method,
            "queries": [{"eval_row": int(qr), "label": int(ql),
                         "neighbours": [int(v) for v in nr], "labels": [int(v) for v in nl],
                         "similarities": [round(float(v), 6) for v in ns]}
                        for qr, ql, nr, nl, ns in zip(queries, q_labels, neighbours, n_labels,
                                                      sims)],
            "settings": {"points": int(len(points)), "method": e.embed_method,
                         "queries": int(len(queries)), "neighbours": k,
                         "bank_examples": train.num_examples}}


# kind -> fn(experiment, params, batch_stats, say, features) -> results with "top1", "settings"
# and "top5" or a one-line "summary".
KINDS: dict[str, Callable] = {"knn": _knn, "linear": _linear, "finetune": _finetune,
                              "fewshot": _fewshot, "embed": _embed}


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
    features = Features(exp, params, batch_stats, workdir, step, say)
    result = KINDS[kind](exp, params, batch_stats, say, features)
    record = {"kind": kind, "step": step, "workdir": workdir, "dataset": exp.train_source.name,
              "eval_dataset": exp.eval_source.name, **result,
              "seconds": round(time.perf_counter() - t0, 1),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = files.join(workdir, "eval", f"{kind}.json")
    if main:
        _write_json(path, record)  # the newest evaluation of this kind
        _write_json(files.join(workdir, "eval", f"{kind}_step{step}.json"), record)
        summary = record.pop("summary", None) or (
            f"{kind} top-1 {record['top1']:.4f}, top-5 {record['top5']:.4f}")
        say(f"{summary} ({record['seconds']:.0f} s); written to {path}")
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
