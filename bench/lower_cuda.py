"""Lowers the model's forward + backward for CUDA on any host (no GPU needed) and reports what
the GPU compile will face: the Python lowering time, Mosaic GPU kernel call sites and distinct
kernels (each distinct `kernel_hash` is compiled once by jaxlib's Mosaic GPU runtime).

    python bench/lower_cuda.py --config=configs/1b.py --set=model.matmul=mgpu

XLA attention stands in for cuDNN's (which checks for a local cuDNN when lowering), and the
model is told it is compiled for a GPU, so `model.matmul=mgpu` takes the kernel path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import apply_overrides  # noqa: E402
from olmo2_jax import config as config_lib  # noqa: E402
from olmo2_jax import model as model_lib  # noqa: E402


def lower(config, batch: int, seq: int) -> dict:
    model_lib.current_platform = lambda: "gpu"  # what attention/matmul choose for
    config.model.attention = "xla"
    cfg = model_lib.ModelConfig.from_config(config.model)
    m = model_lib.Transformer(cfg)
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32)))
    loss = lambda p, t: m.apply(p, t, method="hidden").astype(jnp.float32).mean()  # noqa: E731
    t0 = time.perf_counter()
    text = jax.jit(jax.grad(loss)).trace(
        params, jax.ShapeDtypeStruct((batch, seq), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    return {"lower_s": round(time.perf_counter() - t0, 1), **kernel_counts(text)}


def kernel_counts(text: str) -> dict:
    """From lowered StableHLO text: Mosaic GPU custom-call sites, calls of the shared GEMM
    function (kernels/matmul_mgpu._matmul) and distinct kernels (by `kernel_hash`)."""
    return {"mosaic_call_sites": text.count("custom_call @mosaic_gpu"),
            "matmul_calls": len(re.findall(r"call @_matmul", text)),
            "distinct_kernels": len(set(re.findall(r'kernel_hash = "(.*?)", module', text)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/1b.py")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--unshared", action="store_true",
                    help="trace each GEMM call on its own (the kernel's jit removed), to compare")
    a = ap.parse_args()
    if a.unshared:
        from kernels import matmul_mgpu
        matmul_mgpu._matmul = matmul_mgpu._matmul.__wrapped__
    config = runpy.run_path(a.config)["get_config"]()
    apply_overrides(config, ",".join(a.set))
    config_lib.validate(config, 1)
    print(json.dumps({"config": a.config, "set": a.set, "unshared": a.unshared,
                      "jax": jax.__version__, **lower(config, a.batch, a.seq)}))


if __name__ == "__main__":
    main()
