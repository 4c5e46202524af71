"""Compile the Mosaic TPU attention kernels ahead of time for a TPU topology, on any host.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python launch/aot_attention.py --topology=v5p:2x2x1

Needs the `libtpu` wheel (no TPU hardware). Lowers and compiles forward and backward
(dq, dk/dv kernels) through libtpu's Mosaic compiler, for head_dim 64 and 128, GQA, segment
ids and a length that is not a multiple of the block, so a lowering error shows up here
and not on a pod; then the model's attention with config.model.attention="auto" on a
(data, fsdp, tensor) mesh of the topology's devices, which must pick the Pallas kernels
and run them per shard. Prints one line per case and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the CPU host may run other jobs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402

from kernels import flash_attention  # noqa: E402
from olmo2_jax import ops, sharding  # noqa: E402

# (B, T, N, K, H, segment ids): the model's 7B-like GQA-free shape and a GQA, padded one.
CASES = [(1, 4096, 32, 32, 128, True), (2, 1000, 8, 2, 64, True), (1, 2048, 16, 4, 128, False)]
KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv")


def compile_case(device, B, T, N, K, H, seg):
    """Compiles value_and_grad of the kernel; returns the kernel names found in the HLO."""
    sh = SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=sh)
    s = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh) if seg else None

    def loss(q, k, v, s):
        return flash_attention(q, k, v, s, backend="tpu").astype(jnp.float32).sum()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, s).compile()
    text = compiled.as_text()
    return [name for name in KERNELS if name in text]


def compile_model_attention(devices, B=4, T=2048, N=16, K=4, H=128):
    """The model's attention ("auto") under a (1, n/2, 2) mesh; returns kernel names found."""
    mesh = Mesh(np.asarray(devices).reshape(1, len(devices) // 2, 2), sharding.MESH_AXES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        spec = lambda *names: NamedSharding(mesh, nn.logical_to_mesh_axes(names))  # noqa: E731
        q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16,
                                 sharding=spec("batch", "seq", "heads", "head_dim"))
        kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16,
                                  sharding=spec("batch", "seq", "kv_heads", "head_dim"))
        seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=spec("batch", "seq"))

        def loss(q, k, v, s):
            out = ops.attention(q, k, v, s, "auto")
            return out.astype(jnp.float32).sum()

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = grad.lower(q, kv, kv, seg).compile().as_text()
    return [name for name in KERNELS if name in text]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x1", help="libtpu topology name")
    args = ap.parse_args(argv)
    try:
        topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as e:  # libtpu missing or a bad topology name
        sys.exit(f"aot_attention: cannot get TPU topology {args.topology!r} ({e}); "
                 "install the libtpu wheel (pip install libtpu) and pass e.g. --topology=v5p:2x2x1")
    device = topo.devices[0]
    print(f"topology {args.topology}: {len(topo.devices)} devices, {device.device_kind}")
    for case in CASES:
        t = time.perf_counter()
        found = compile_case(device, *case)
        missing = [k for k in KERNELS if k not in found]
        status = "ok" if not missing else f"MISSING {missing}"
        print(f"B,T,N,K,H,seg={case}: {status} ({time.perf_counter() - t:.1f}s)", flush=True)
        if missing:
            sys.exit(1)
    t = time.perf_counter()
    found = compile_model_attention(topo.devices[:4])
    missing = [k for k in KERNELS if k not in found]
    status = "ok" if not missing else f"MISSING {missing}"
    print(f"model attention='auto', mesh (1, 2, 2): {status} ({time.perf_counter() - t:.1f}s)")
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
