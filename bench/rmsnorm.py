"""RMSNorm forward + backward at the 1B step's shape: XLA's autodiff against
kernels/rmsnorm_gpu.py (XLA forward, one-pass Pallas backward), checked against XLA first.

    python bench/rmsnorm.py --out=/tmp/rmsnorm.json       # a CUDA GPU
    python bench/rmsnorm.py --tokens=256 --interpret      # anywhere (Pallas interpreter)
    python bench/rmsnorm.py --sweep                       # + each tile setting of ours

Rows: the post-norms' shape (tokens, 2048) with scale (2048,) and QK-norm's (tokens, 16, 128)
with scale (16, 128); times are for the forward and the backward together, as in a step.
`qk_norm_rope`: QK-norm then RoPE, XLA's autodiff of both against rmsnorm_gpu.rms_norm_rope
(one backward pass for the two). The model runs ours under model.kernels='auto' on a GPU,
XLA's under model.kernels='xla'.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import rel_err, report, time_fn  # noqa: E402
from kernels import rmsnorm_gpu  # noqa: E402

EPS = 1e-6


def bench_shape(name, x_shape, scale_shape, interpret=False, impls=("xla", "ours")):
    """Rows for `impls` at one shape, ours checked against XLA's forward, dx and dscale."""
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], x_shape, jnp.bfloat16) * 2
    scale = 1 + 0.1 * jax.random.normal(k[1], scale_shape, jnp.float32)
    dy = jax.random.normal(k[2], x_shape, jnp.bfloat16)
    return _compare(name, (x, scale, dy), impls,
                    xla=lambda x, s: rmsnorm_gpu.reference(x, s, EPS, jnp.bfloat16),
                    ours=lambda x, s: rmsnorm_gpu.rms_norm(x, s, EPS, jnp.bfloat16,
                                                           interpret=interpret))


def bench_rope(tokens, interpret=False, impls=("xla", "ours")):
    """QK-norm + RoPE at (tokens / 4096 sequences of 4096, 16, 128), ours checked first."""
    B, T, N, H = max(1, tokens // 4096), min(tokens, 4096), 16, 128
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (B, T, N, H), jnp.bfloat16) * 2
    scale = 1 + 0.1 * jax.random.normal(k[1], (N, H), jnp.float32)
    dy = jax.random.normal(k[2], x.shape, jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return _compare("qk_norm_rope", (x, scale, dy), impls,
                    xla=lambda x, s: rmsnorm_gpu.apply_rope(
                        rmsnorm_gpu.reference(x, s, EPS, jnp.bfloat16), pos, 5e5),
                    ours=lambda x, s: rmsnorm_gpu.rms_norm_rope(x, s, pos, 5e5, EPS, jnp.bfloat16,
                                                                interpret=interpret))


def _compare(name, args, impls, **norms):
    """Forward + backward of each of `norms` (x, scale) -> y on args (x, scale, dy), jitted;
    ours checked against XLA's y, dx and dscale first, then a timed row per impl."""
    def step(norm):
        def f(x, scale, dy):
            y, vjp = jax.vjp(norm, x, scale)
            return (y, *vjp(dy))
        return jax.jit(f)

    steps = {impl: step(norm) for impl, norm in norms.items()}
    errs = [rel_err(a, b) for a, b in zip(steps["ours"](*args), steps["xla"](*args))]
    if max(errs) > 1e-2:
        raise AssertionError(f"{name}: max errors (y, dx, dscale) {errs} against XLA")
    rows = []
    for impl, f in steps.items():
        if impl not in impls:
            continue
        t = time_fn(f, args)
        rows.append({"shape": name, "x": list(args[0].shape), "impl": impl,
                     "ms": round(t * 1e3, 4),
                     **({"max_rel_err": [round(e, 6) for e in errs]} if impl == "ours" else {})})
    return rows


def sweep(name, x_shape, scale_shape, interpret=False):
    """Our rows at each (rows, max_steps, num_warps) setting, the tuning restored after."""
    tuning = rmsnorm_gpu.ROPE_TUNING if name == "qk_norm_rope" else rmsnorm_gpu.TUNING
    saved, rows = dict(tuning), []
    try:
        for r, steps, warps in itertools.product((2, 4, 8, 16), (4, 8), (4, 8, 16)):
            tuning.update(rows=r, max_steps=steps, num_warps=warps)
            if name == "qk_norm_rope":
                row, = bench_rope(x_shape, interpret, impls=("ours",))
            else:
                row, = bench_shape(name, x_shape, scale_shape, interpret, impls=("ours",))
            rows.append({**row, "tuning": dict(tuning)})
    finally:
        tuning.clear()
        tuning.update(saved)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768, help="rows (batch x seq)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (no GPU)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time ours at each (rows, max_steps, num_warps) setting")
    ap.add_argument("--only", default="", help="comma-separated shapes (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    only = set(filter(None, a.only.split(","))) or {"post_norm", "qk_norm", "qk_norm_rope"}

    def rows():  # produced one by one, so each prints as soon as it is measured
        for name, xs, ss in (("post_norm", (a.tokens, 2048), (2048,)),
                             ("qk_norm", (a.tokens, 16, 128), (16, 128))):
            if name not in only:
                continue
            yield from bench_shape(name, xs, ss, a.interpret)
            if a.sweep:
                yield from sweep(name, xs, ss, a.interpret)
        if "qk_norm_rope" not in only:
            return
        yield from bench_rope(a.tokens, a.interpret)
        if a.sweep:
            yield from sweep("qk_norm_rope", a.tokens, None, a.interpret)

    report(rows(), a.out, tokens=a.tokens)


if __name__ == "__main__":
    main()
