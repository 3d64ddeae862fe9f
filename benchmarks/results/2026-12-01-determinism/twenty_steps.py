import os, sys, hashlib
import numpy as np, jax
from jaxssl import configuration, train
c = configuration.load_config("demo")
configuration.apply_overrides(c, [("num_steps", "20"), ("eval.knn", "false"), ("log_every_steps", "10"),
                                  ("checkpoint_every_steps", "20"), ("eval_every_steps", "20")])
r = train.train(c, f"/tmp/prof/isa_{os.getpid()}")
leaves = [np.asarray(x) for x in jax.tree.leaves(r.state.params)]
np.savez(sys.argv[1], *leaves)
h = hashlib.sha256(b"".join(l.tobytes() for l in leaves)).hexdigest()[:16]
print("RESULT", os.environ.get("XLA_FLAGS"), h, open(f"/tmp/prof/isa_{os.getpid()}/metrics.jsonl").read().splitlines()[-1][:160])
