"""`jaxssl eval knn|linear|finetune|fewshot` and `jaxssl export` on a tiny trained workdir (8
fake CPU devices), the label-fraction subset, and the fine-tuning step (8 devices equal one)."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

from jaxssl import cli, models, parallel, state
from jaxssl import export as export_lib
from jaxssl.evaluate import fewshot, finetune, topk
from test_train import tiny_config
from tiny import IMAGE, assert_trees_close, copy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jaxssl import train

    wd = tmp_path_factory.mktemp("trained")
    # Every checkpoint kept (3, 6, 9, 12): evaluating step 6 must not depend on which step the
    # kNN monitor happened to rank best.
    result = train.train(tiny_config(("checkpoint.keep", "4")), str(wd))
    assert result.status == "done" and result.step == 12
    return str(wd), jax.device_get(result.state)


@pytest.fixture(scope="module")
def workdir(trained):
    return trained[0]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _eval(workdir, kind, *extra):
    assert cli.main(["eval", kind, "--workdir", workdir, *extra]) == 0
    with open(os.path.join(workdir, "eval", f"{kind}.json")) as f:
        return json.load(f)


def test_the_trainer_logs_the_online_probe(workdir):
    probe = [r["train/online_top1"] for r in _records(workdir) if "train/online_top1" in r]
    assert probe and all(0.0 <= p <= 1.0 for p in probe)


def test_eval_knn_is_the_trainers_monitor(workdir, capsys):
    knn = {r["step"]: r["eval/knn_top1"] for r in _records(workdir) if "eval/knn_top1" in r}
    latest = _eval(workdir, "knn")
    assert latest["step"] == 12 and latest["top1"] == knn[12]
    assert latest["top1"] <= latest["top5"] <= 1.0
    assert "knn top-1" in capsys.readouterr().out
    assert _eval(workdir, "knn", "--step", "6")["top1"] == knn[6]


def test_eval_linear_equals_the_probe_on_features_computed_directly(trained):
    """The CLI's padded, device-split features and labels give the classifier that features
    computed here (unpadded, one call per split) give: rows and labels stay aligned."""
    from jaxssl import experiment
    from jaxssl.data import sources
    from jaxssl.evaluate import linear
    from jaxssl.evaluate.features import FeatureExtractor

    workdir, state = trained
    record = _eval(workdir, "linear", "--config.eval.linear_epochs=3")
    assert record["settings"]["epochs"] == 3 and record["settings"]["train_examples"] == 5000
    config = tiny_config()
    model, _ = experiment.build_model(config)
    mesh = parallel.make_mesh()
    train_src, test_src = sources.load_builtin("train"), sources.load_builtin("test")
    extract = FeatureExtractor(models.flax_apply_fn(model), mesh, mean=train_src.mean,
                               std=train_src.std, size=16, batch_size=1000)
    f_train = extract(state.params, state.batch_stats, train_src, np.arange(5000))
    f_test = extract(state.params, state.batch_stats, test_src, np.arange(1000))
    classifier = linear.train_linear_classifier(
        f_train, train_src.labels, num_classes=10, epochs=3, batch_size=256,
        learning_rate=0.1, seed=0, mesh=mesh)
    want = linear.evaluate_linear_classifier(classifier, f_test, test_src.labels, mesh=mesh)
    assert record["top1"] == pytest.approx(want["top1"], abs=0.003)
    assert record["top5"] == pytest.approx(want["top5"], abs=0.003)


def test_eval_linear_with_augmented_copies(workdir):
    record = _eval(workdir, "linear", "--config.eval.linear_epochs=4",
                   "--config.eval.linear_augment_copies=2")
    assert record["settings"]["epochs"] == 2 and record["settings"]["augment_copies"] == 2
    assert len(record["train_history"]) == 2
    assert 0.1 < record["top1"] <= record["top5"] <= 1.0


def test_eval_finetune_on_two_percent_of_the_labels(workdir):
    record = _eval(workdir, "finetune", "--config.eval.finetune_fraction=0.02",
                   "--config.eval.finetune_epochs=2", "--config.eval.finetune_batch_size=32")
    assert 0.0 <= record["top1"] <= record["top5"] <= 1.0
    assert record["settings"]["labelled_examples"] == 100  # 10 of each of the 10 classes
    assert len(record["train_history"]) == 2


def test_eval_fewshot_on_a_trained_workdir(workdir, capsys):
    args = ["eval", "fewshot", "--workdir", workdir, "--config.eval.fewshot_shots=(1, 5)",
            "--config.eval.fewshot_draws=3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "1-shot: top-1" in out and "5-shot: top-1" in out and "over 3 draws" in out
    with open(os.path.join(workdir, "eval", "fewshot.json")) as f:
        record = json.load(f)
    five = record["shots"]["5"]
    assert record["top1"] == five["top1_mean"] == pytest.approx(np.mean(five["top1"]))
    assert five["top1_std"] == pytest.approx(np.std(five["top1"]))
    assert len(five["top1"]) == 3 and all(0 <= a <= 1 for a in five["top1"])
    assert all(lam in fewshot.LAMBDAS for lam in five["lambda"])
    assert record["settings"]["shots"] == [1, 5] and record["settings"]["val_per_class"] == 10
    # Seeded: the same command, the same figures.
    assert cli.main(args) == 0
    with open(os.path.join(workdir, "eval", "fewshot.json")) as f:
        assert json.load(f)["shots"] == record["shots"]
    # More shots than the smallest class holds: one line, what to change.
    assert cli.main(["eval", "fewshot", "--workdir", workdir,
                     "--config.eval.fewshot_shots=(1000,)"]) == 2
    err = capsys.readouterr().err
    assert "train examples; the few-shot probe draws 1010 of each class" in err
    assert err.count("\n") == 1


class _CountRows:
    """Wraps FeatureExtractor.__call__ to count the images it encodes."""

    def __init__(self, monkeypatch):
        from jaxssl.evaluate.features import FeatureExtractor

        self.rows, original = 0, FeatureExtractor.__call__

        def counted(extractor, params, batch_stats, source, indices, **kw):
            self.rows += len(indices)
            return original(extractor, params, batch_stats, source, indices, **kw)

        monkeypatch.setattr(FeatureExtractor, "__call__", counted)


def test_features_are_cached_per_checkpoint_and_reused(workdir, monkeypatch, capsys):
    first = _eval(workdir, "knn", "--step", "9")  # computes the bank and the queries
    knn_rows = first["settings"]["bank_examples"] + first["settings"]["query_examples"]
    folder = os.path.join(workdir, "eval", "features-9")

    def cached():
        manifest = json.load(open(os.path.join(folder, "manifest.json")))
        return sum(e["count"] for e in manifest["splits"].values())

    assert cached() == knn_rows
    count = _CountRows(monkeypatch)
    again = _eval(workdir, "knn", "--step", "9")
    assert count.rows == 0 and again == {**first, **_timing(again)}
    # Few-shot encodes only the rows the kNN evaluation did not, and then none.
    fewshot_args = ("fewshot", "--step", "9", "--config.eval.fewshot_draws=1")
    fewshot_record = _eval(workdir, *fewshot_args)
    assert 0 < count.rows == cached() - knn_rows
    count.rows = 0
    assert _eval(workdir, *fewshot_args)["shots"] == fewshot_record["shots"]
    assert count.rows == 0
    # Without the cache: encoded again, the same figures.
    uncached = _eval(workdir, *fewshot_args, "--config.eval.feature_cache=false")
    assert uncached["shots"] == fewshot_record["shots"] and count.rows > 0
    count.rows = 0
    off = _eval(workdir, "knn", "--step", "9", "--config.eval.feature_cache=false")
    assert count.rows == knn_rows and off["top1"] == first["top1"]
    # Other data: recomputed, and the cache replaced (the eval split is now the train split).
    capsys.readouterr()
    count.rows = 0
    _eval(workdir, "knn", "--step", "9", "--config.data.eval_split=train")
    assert "recomputing" in capsys.readouterr().out and count.rows == knn_rows
    # Another checkpoint at the same step (a workdir trained again): its cache is not read.
    import shutil

    shutil.rmtree(os.path.join(workdir, "eval", "features-6"), ignore_errors=True)
    shutil.copytree(folder, os.path.join(workdir, "eval", "features-6"))
    count.rows = 0
    _eval(workdir, "knn", "--step", "6")
    assert "another checkpoint" in capsys.readouterr().out and count.rows == knn_rows


def _timing(record):
    return {k: record[k] for k in ("seconds", "date")}


def test_eval_embed_writes_a_map_and_a_retrieval_grid(trained, monkeypatch):
    import sys

    from PIL import Image

    from jaxssl import experiment
    from jaxssl.data import sources
    from jaxssl.evaluate import embed
    from jaxssl.evaluate.features import FeatureExtractor

    workdir, state = trained
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn absent: PCA
    record = _eval(workdir, "embed", "--config.eval.embed_points=300",
                   "--config.eval.embed_queries=4", "--config.eval.embed_neighbours=5")
    assert record["method"] == "pca" and record["settings"]["points"] == 300
    assert Image.open(record["map"]).size == embed.MAP_SIZE
    assert Image.open(record["retrieval"]).size == embed.retrieval_size(4, 5)
    # The neighbours are the brute-force cosine search on features computed here, in float64.
    model, _ = experiment.build_model(tiny_config())
    train_src, test_src = sources.load_builtin("train"), sources.load_builtin("test")
    extract = FeatureExtractor(models.flax_apply_fn(model), parallel.make_mesh(),
                               mean=train_src.mean, std=train_src.std, size=16, batch_size=1000)
    bank = np.asarray(extract(state.params, state.batch_stats, train_src, np.arange(5000)),
                      np.float64)
    rows = [q["eval_row"] for q in record["queries"]]
    queries = np.asarray(extract(state.params, state.batch_stats, test_src, np.array(rows)),
                         np.float64)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    for q, s in zip(record["queries"], sims):
        assert q["neighbours"] == list(np.argsort(-s, kind="stable")[:5])
        np.testing.assert_allclose(q["similarities"], s[q["neighbours"]], atol=1e-5)
        assert q["labels"] == [int(train_src.labels[i]) for i in q["neighbours"]]
        assert q["label"] == int(test_src.labels[q["eval_row"]])
    assert record["top1"] == np.mean([q["labels"][0] == q["label"] for q in record["queries"]])


def test_eval_linear_sweeps_learning_rates_on_held_out_train_images(workdir, capsys):
    record = _eval(workdir, "linear", "--config.eval.linear_lr=0.01,0.1,1",
                   "--config.eval.linear_epochs=2")
    sweep = record["sweep"]
    assert [t["base_lr"] for t in sweep] == [0.01, 0.1, 1.0]
    best = max(sweep, key=lambda t: (t["val_top1"], -t["val_loss"]))
    assert record["settings"]["learning_rate"] == best["learning_rate"]
    assert record["val_top1"] == best["val_top1"]
    assert record["settings"]["held_out_examples"] == 500
    assert record["settings"]["train_examples"] == 4500
    assert len(record["train_history"][-1]["loss"]) == 3
    assert "<- chosen" in capsys.readouterr().out
    _one_line_error(capsys, ["eval", "linear", "--workdir", workdir,
                             "--config.eval.linear_lr=0.1,-1"], "eval.linear_lr must be")


def test_export_both_formats_hold_the_trained_backbone(trained, tmp_path, capsys):
    workdir, state = trained  # the trainer's own final state, not read back from the checkpoint
    params, stats = state.params["backbone"], state.batch_stats["backbone"]
    out = str(tmp_path / "backbone.msgpack")
    assert cli.main(["export", "--workdir", workdir, "--format", "msgpack", "--output", out]) == 0
    p, s, meta = export_lib.load_msgpack(out)
    assert_trees_close(p, params, rtol=0)
    assert_trees_close(s, stats, rtol=0)
    assert meta["encoder"] == "resnet18" and meta["step"] == "12" and "mean" in meta
    out = str(tmp_path / "backbone.safetensors")
    assert cli.main(["export", "--workdir", workdir, "--output", out]) == 0
    from safetensors.numpy import load_file

    p, s = export_lib.from_torchvision_state_dict(load_file(out))
    assert_trees_close(p, params, rtol=0)
    assert_trees_close(s, stats, rtol=0)
    assert "not torchvision's 64" in capsys.readouterr().out  # width 4


def _one_line_error(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_input_gives_one_line(workdir, tmp_path, capsys):
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    _one_line_error(capsys, ["eval", "knn", "--workdir", str(tmp_path / "nothing")],
                    "does not exist")
    _one_line_error(capsys, ["eval", "knn", "--workdir", str(tmp_path)], "no config.json")
    _one_line_error(capsys, ["eval", "linear", "--workdir", workdir, "--step", "5"],
                    "saved steps: ")
    _one_line_error(capsys, ["eval", "knn", "--workdir", workdir, "--config.model.width=8"],
                    "different model")
    _one_line_error(capsys, ["export", "--workdir", workdir, "--output",
                             str(tmp_path / "no" / "such" / "dir.safetensors")], "does not exist")
    _one_line_error(capsys, ["eval", "finetune", "--workdir", workdir,
                             "--config.eval.finetune_fraction=2"], "finetune_fraction")
    with pytest.raises(SystemExit):  # argparse: exit 2 with the valid choices
        cli.main(["export", "--workdir", workdir, "--format", "pickle", "--output", "x"])
    assert "safetensors" in capsys.readouterr().err
    # The failures lost nothing that was saved.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37])
def test_label_fraction_is_balanced_and_reproducible(fraction):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), [500, 300, 200, 1000, 50, 120, 80])
    rng.shuffle(labels)
    idx = finetune.label_fraction(labels, fraction, seed=3)
    counts = np.bincount(labels[idx], minlength=7)
    expected = [max(1, round(fraction * n)) for n in np.bincount(labels)]
    np.testing.assert_array_equal(counts, expected)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, finetune.label_fraction(labels, fraction, seed=3))
    assert not np.array_equal(idx, finetune.label_fraction(labels, fraction, seed=4))
    # A smaller fraction's subset lies inside a larger one's (same seed).
    assert set(finetune.label_fraction(labels, fraction / 2, seed=3)) <= set(idx)


def test_label_fraction_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fraction"):
        finetune.label_fraction(np.zeros(10, int), 0.0, seed=0)


def test_topk_correct_against_numpy_and_ties_break_as_argmax():
    rng = np.random.default_rng(1)
    # Scores on a coarse grid: many ties, as kNN votes of a collapsed encoder have.
    scores = rng.integers(0, 3, size=(200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    for k in (1, 3, 7, 9):
        # numpy's stable argsort of -scores puts equal scores in index order, as argmax does.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        expected = np.array([labels[i] in order[i] for i in range(200)], np.float32)
        np.testing.assert_array_equal(topk.topk_correct(scores, labels, k), expected)
    np.testing.assert_array_equal(topk.topk_correct(scores, labels, 1),
                                  (scores.argmax(1) == labels).astype(np.float32))
    # kNN: a class nobody voted for is never a hit, even when fewer than k classes got votes.
    votes = np.array([[0.0, 2.0, 0.0, 1.0], [0.0, 2.0, 0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(topk.topk_correct(votes, np.array([0, 3]), 5), [1.0, 1.0])
    np.testing.assert_array_equal(
        topk.topk_correct(votes, np.array([0, 3]), 5, require_positive=True), [0.0, 1.0])
    # All-equal logits: only the first class counts for top-1, not every class.
    assert float(np.mean(topk.topk_correct(np.zeros((4, 5)), np.arange(4), 1))) == 0.25


def _finetune_setup(bn_axis_name):
    backbone = models.ResNet18(width=4, cifar_stem=True, bn_axis_name=bn_axis_name)
    model = finetune.Classifier(backbone=backbone, num_classes=5)
    params, stats = models.init_variables(model, jax.random.key(0), (1, IMAGE, IMAGE, 3))
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    step = functools.partial(
        finetune.finetune_step, apply_fn=models.flax_apply_fn(model), tx=tx,
        augment_fn=finetune.finetune_augment(IMAGE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                             (0.3, 1.0)))
    return state.create_train_state(params, stats, tx), step


def test_finetune_step_on_8_devices_equals_one():
    rng = np.random.default_rng(0)
    batches = [{"images": rng.integers(0, 256, (32, IMAGE, IMAGE, 3), dtype=np.uint8),
                "labels": rng.integers(0, 5, 32).astype(np.int32)} for _ in range(2)]
    st, step = _finetune_setup(None)
    step = jax.jit(step)
    mesh = parallel.make_mesh()
    st8, step8 = _finetune_setup(parallel.DATA_AXIS)
    step8 = parallel.compile_step(step8, mesh, donate_state=False)
    st8 = jax.device_put(st8, parallel.replicated(mesh))
    for batch in batches:
        st, m1 = step(st, batch, jax.random.key(5))
        st8, m8 = step8(st8, parallel.host_to_global(batch, mesh), jax.random.key(5))
        np.testing.assert_allclose(float(m1["train/loss"]), float(m8["train/loss"]), rtol=1e-5)
    # The whole network moved (the backbone too, not only the classifier), identically.
    assert_trees_close(copy(st.params), copy(st8.params), rtol=1e-4, atol=1e-6)
    assert_trees_close(copy(st.batch_stats), copy(st8.batch_stats), rtol=1e-4, atol=1e-6)
    fresh, _ = _finetune_setup(None)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         st.params["backbone"], fresh.params["backbone"])
    assert max(jax.tree.leaves(moved)) > 0
