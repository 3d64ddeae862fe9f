"""`jaxssl train` and `jaxssl eval knn` where TensorFlow, TensorFlow Datasets and tensorboard are
not installed (the GPU machines have none of them): in-memory data, device augmentation, the kNN
monitor, checkpoints and the evaluation all run, and none of the three is ever loaded.

The packages are made absent, not broken: the interpreter's path finder is wrapped so that it
does not find them, which is what both `import` and `importlib.util.find_spec` (etils asks it
whether TensorFlow is there) see on a machine without them.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_NPZ = os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10_jpeg.npz")

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    from importlib.machinery import PathFinder

    ABSENT = ("tensorflow", "tensorflow_datasets", "tensorboard")

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in ABSENT:
                return None
            return PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [Absent() if f is PathFinder else f for f in sys.meta_path]
    from jaxssl import cli

    workdir, overrides = sys.argv[1], sys.argv[2:]
    assert cli.main(["train", "--config", "demo", "--workdir", workdir] + overrides) == 0
    assert cli.main(["eval", "knn", "--workdir", workdir]) == 0
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & set(ABSENT))
    assert not loaded, loaded
    print("ok")
""")

TINY = [
    ("num_steps", "2"), ("batch_size", "16"), ("log_every_steps", "1"),
    ("eval_every_steps", "2"), ("checkpoint_every_steps", "2"),
    ("model.width", "4"), ("model.head_hidden_dims", "(16,)"), ("model.out_dim", "8"),
    ("data.out_size", "16"), ("data.augment", "device"), ("eval.bank_examples", "400"),
    ("eval.query_examples", "160"), ("eval.batch_size", "160"), ("eval.knn_k", "20"),
]


@pytest.mark.parametrize("source", ["builtin", "cifar10_npz"])
def test_train_and_eval_knn_without_tensorflow_or_tensorboard(source, tmp_path):
    overrides = list(TINY)
    if source == "cifar10_npz":
        if not os.path.isfile(CIFAR10_NPZ):
            pytest.skip(f"the CIFAR-10 JPEG npz is not at {os.path.normpath(CIFAR10_NPZ)} "
                        "(../shared/data/cifar10/ next to the repository)")
        overrides += [("data.source", "cifar10_npz"), ("data.path", CIFAR10_NPZ)]
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(workdir)] + [f"--config.{k}={v}" for k, v in overrides],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert out.stdout.rstrip().endswith("ok"), out.stdout[-2000:]
    # One notice instead of a crash, and everything else a run writes is there.
    assert "tensorboard package is not installed" in out.stdout + out.stderr
    assert not (workdir / "tensorboard").exists()
    for name in ("metrics.jsonl", "config.json", "checkpoints", "eval/knn.json"):
        assert (workdir / name).exists(), name
    assert '"eval/knn_top1"' in (workdir / "metrics.jsonl").read_text()
