"""The accelerator path end to end, in miniature: in-memory data, device augmentation inside
the sharded step, and no TensorFlow anywhere (the GPU machines have none)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np
    from jaxssl import models, optim, parallel, state, steps
    from jaxssl.data import augment_jax, pipeline, recipes, sources

    source = sources.load_builtin("test")
    mesh = parallel.make_mesh()
    model = models.create_model("resnet18", cifar_stem=True, width=4, head_hidden_dims=(16,),
                                out_dim=8, bn_axis_name=parallel.DATA_AXIS)
    params, bs = models.init_variables(model, jax.random.key(0), (1, 24, 24, 3))
    tx = optim.make_optimizer("lars", 0.1)
    st = jax.device_put(state.create_train_state(params, bs, tx), parallel.replicated(mesh))
    augment = augment_jax.make_device_augment(recipes.get_recipe("simclr_cifar"), 24,
                                              source.mean, source.std)
    step = parallel.compile_step(functools.partial(
        steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx, temperature=0.5,
        augment_fn=augment), mesh)
    losses = []
    for batch in pipeline.make_pipeline(source, global_batch=16, seed=0, mode="device", num_steps=2):
        st, m = step(st, parallel.host_to_global(batch["images"], mesh), jax.random.key(1))
        losses.append(float(m["train/loss"]))
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    tf = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
    assert not tf, tf
    print("ok", losses)
""")


def test_device_path_runs_without_tensorflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
