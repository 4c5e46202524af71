"""How long a checkpoint save blocks the training loop (async) and how long a restore takes.

    python bench/checkpoint.py --config=configs/1b.py --dir=/tmp/ckbench --out=/tmp/ck.json
    python bench/checkpoint.py --tiny --dir=/tmp/ckbench --out=/tmp/ck.json      # CPU smoke

Builds the config's full TrainState (params + AdamW moments, fp32: 12 bytes/param, ~16.6 GiB for
the 1B shape) sharded over all local devices with the config's mesh, then per repeat:
`blocking_s` = time until the async `save()` returns (device->host copy; the loop is
stalled only this long), `commit_s` = time until the write is committed, `restore_s` =
a fresh manager restoring into the same shardings (until arrays are ready). --dir may be
gs://. Writes JSON (with date, host and devices) to --out and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import runpy
import socket
import statistics
import time

import jax
from flax import linen as nn

from olmo2_jax import checkpoint, optim, sharding, train
from olmo2_jax.model import ModelConfig, Transformer


def run(config, directory: str, repeats: int) -> dict:
    mesh = sharding.make_mesh(config)
    model = Transformer(ModelConfig.from_config(config.model))
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.PRNGKey(0)
    rows = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, _ = train.create_state(model, tx, mesh, rng)
        abstract, _ = train.state_shardings(model, tx, mesh, rng)
        jax.block_until_ready(state)
        n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        for r in range(repeats):
            path = f"{directory.rstrip('/')}/r{r}"
            manager = checkpoint.make_manager(path, keep=1, async_save=True)
            t0 = time.perf_counter()
            checkpoint.save(manager, 1, state, None, {"bench": r})
            blocking = time.perf_counter() - t0
            manager.wait_until_finished()
            commit = time.perf_counter() - t0
            manager.close()
            manager = checkpoint.make_manager(path, keep=1, async_save=True)
            t0 = time.perf_counter()
            restored, _ = checkpoint.restore(manager, 1, abstract, None)
            jax.block_until_ready(restored)
            restore = time.perf_counter() - t0
            manager.close()
            del restored
            rows.append({"blocking_s": blocking, "commit_s": commit, "restore_s": restore})
            print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    rest = rows[1:] or rows
    return {"state_bytes": n_bytes, "state_gib": n_bytes / 2**30, "repeats": rows,
            "first": first,
            "median_after_first": {k: statistics.median(r[k] for r in rest) for k in first}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/1b.py")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.py (CPU smoke run)")
    p.add_argument("--dir", required=True, help="checkpoint root (local or gs://)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    config_path = "configs/tiny.py" if args.tiny else args.config
    config = runpy.run_path(config_path)["get_config"]()
    result = run(config, args.dir, args.repeats)
    result.update(config=config_path, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  host=socket.gethostname(), devices=[d.device_kind for d in jax.devices()],
                  jax=jax.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("state_gib", "first", "median_after_first")}))


if __name__ == "__main__":
    main()
