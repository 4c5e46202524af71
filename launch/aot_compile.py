"""Compiles the full training step ahead of time for a TPU pod, on any machine (no TPU).

    pip install libtpu
    python launch/aot_compile.py --config=configs/32b.py --topology=v5p:8x8x8

Uses libtpu's compiler through `jax.experimental.topologies`: the config's mesh over the
topology's chips, its global batch and micro-batch, the real `train_step` (sharded state,
donation). Prints per-chip memory (arguments, temporaries, total) against the chip's HBM
and the compiled FLOPs, and exits 1 with a clear message when the step does not fit.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Compiling needs no TPU: let several compiles (and a test run) share libtpu on one host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "e.g. v5p:2x2x1, v5p:8x8x8, v6e:16x16")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")

# HBM per chip (bytes) by the topology's chip name.
HBM = {"v4": 32e9, "v5e": 16e9, "v5litepod": 16e9, "v5p": 95e9, "v6e": 32e9}


def hbm_bytes(topology: str) -> float:
    chip = topology.split(":")[0].lower()
    if chip not in HBM:
        raise SystemExit(f"error: unknown TPU chip {chip!r} in --topology; known: {sorted(HBM)}")
    return HBM[chip]


def compile_step(config, topology: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from jax.experimental import topologies

    from olmo2_jax import config as config_lib
    from olmo2_jax import optim, sharding, train
    from olmo2_jax.loss import LossConfig
    from olmo2_jax.model import ModelConfig, Transformer

    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 -- libtpu's errors are long; name the flag
        raise SystemExit(f"error: --topology={topology!r} was not understood by libtpu: {e}")
    devices = topo.devices
    config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config, devices)
    model = Transformer(ModelConfig.from_config(config.model))
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    t = config.train
    accum = t.global_batch_size // config_lib.micro_batch_size(config)
    B, T = t.global_batch_size, config.data.seq_len
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: nothing is placed on a device
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        abstract, shardings = train.state_shardings(model, tx, mesh, rng)
        bs = sharding.batch_sharding(mesh)
        batch = {"inputs": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bs),
                 "targets": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bs),
                 "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=bs)}
        step = train.jit_train_step(model, tx, schedule, LossConfig.from_config(config),
                                    accum_steps=accum, mesh=mesh, shardings=shardings,
                                    batch_sharding=bs)
        t0 = time.time()
        lowered = step.lower(abstract, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 -- the compiler reports HBM OOM as an error
            if "HbmOom" not in str(e) and "RESOURCE_EXHAUSTED" not in str(e):
                raise
            msg = str(e).split("\n")[0]
            raise SystemExit(
                f"error: {config_lib.micro_batch_size(config)}-sequence micro-batches do not fit "
                f"{topology} ({msg}); lower config.train.micro_batch_size, use "
                "model.remat=full, or a larger topology")
        seconds = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args = mem.argument_size_in_bytes
    temp = mem.temp_size_in_bytes
    out = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated outputs reuse args
    total = args + temp + out + getattr(mem, "generated_code_size_in_bytes", 0)
    return {"config_params": config_lib.count_params(config.model)["total"],
            "topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
            "global_batch": B, "seq_len": T, "micro_batch": config_lib.micro_batch_size(config),
            "remat": config.model.remat, "compile_s": round(seconds, 1),
            "per_chip_gb": {"arguments": args / 1e9, "temporaries": temp / 1e9,
                            "outputs_not_aliased": out / 1e9, "total": total / 1e9},
            "hbm_gb": hbm_bytes(topology) / 1e9,
            # XLA's cost analysis counts each while-loop body once (layer scan, micro-batch
            # scan), so it is far below the model FLOPs: both are reported.
            "cost_analysis_tflops_per_chip": (cost or {}).get("flops", 0) / 1e12,
            "model_tflops_per_chip_per_step": config_lib.flops_per_token(config.model, T) * B * T
            / len(devices) / 1e12}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    hbm = hbm_bytes(_TOPOLOGY.value)
    res = compile_step(_CONFIG.value, _TOPOLOGY.value)
    m = res["per_chip_gb"]
    print(json.dumps(res, indent=2))
    print(f"per chip: arguments {m['arguments']:.2f} GB + temporaries {m['temporaries']:.2f} GB "
          f"= {m['total']:.2f} GB of {hbm / 1e9:.0f} GB HBM "
          f"({100 * m['total'] * 1e9 / hbm:.0f}%); model {res['model_tflops_per_chip_per_step']:.0f} "
          f"TFLOP per chip per step (XLA cost analysis: {res['cost_analysis_tflops_per_chip']:.1f}, "
          f"loop bodies counted once); compile {res['compile_s']} s")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(res, f, indent=2)
    if m["total"] * 1e9 > hbm:
        sys.exit(f"error: the step needs {m['total']:.1f} GB per chip but {_TOPOLOGY.value} has "
                 f"{hbm / 1e9:.0f} GB: lower config.train.micro_batch_size, use model.remat=full, "
                 "or a larger topology")


if __name__ == "__main__":
    app.run(main)
