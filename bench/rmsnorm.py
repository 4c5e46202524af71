"""RMSNorm forward + backward at the 1B step's shape: XLA's autodiff against
kernels/rmsnorm_gpu.py (XLA forward, one-pass Pallas backward), checked against XLA first.

    python bench/rmsnorm.py --out=/tmp/rmsnorm.json       # a CUDA GPU
    python bench/rmsnorm.py --tokens=256 --interpret      # anywhere (Pallas interpreter)
    python bench/rmsnorm.py --sweep                       # + each tile setting of ours

Rows: the post-norms' shape (tokens, 2048) with scale (2048,) and QK-norm's (tokens, 16, 128)
with scale (16, 128); times are for the forward and the backward together, as in a step.
`qk_norm_rope`: QK-norm then RoPE, XLA's autodiff of both against rmsnorm_gpu.rms_norm_rope
(one backward pass for the two; model.rope_impl='pallas'). `post_norm_add`: the post-norms as
the model runs them, residual + norm(x). Impl `ours_fwd`: the forward in one Pallas pass too
(fused_forward=True; model.norm_fwd_impl='pallas'). Each row has `ms` (forward + backward)
and `fwd_ms` (the forward alone).
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


def bench_shape(name, x_shape, scale_shape, interpret=False, impls=("xla", "ours", "ours_fwd")):
    """Rows for `impls` at one shape, ours checked against XLA's forward, dx and dscale;
    name 'post_norm_add' adds a residual to the norm's output."""
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], x_shape, jnp.bfloat16) * 2
    scale = 1 + 0.1 * jax.random.normal(k[1], scale_shape, jnp.float32)
    dy = jax.random.normal(k[2], x_shape, jnp.bfloat16)
    r = jax.random.normal(k[3], x_shape, jnp.bfloat16) if name == "post_norm_add" else None

    def xla(x, s):
        y = rmsnorm_gpu.reference(x, s, EPS, jnp.bfloat16)
        return y if r is None else r + y

    def ours(fused):
        return lambda x, s: rmsnorm_gpu.rms_norm(x, s, EPS, jnp.bfloat16, residual=r,
                                                 fused_forward=fused, interpret=interpret)

    return _compare(name, (x, scale, dy), impls, xla=xla, ours=ours(False), ours_fwd=ours(True))


def bench_rope(tokens, interpret=False, impls=("xla", "ours", "ours_fwd")):
    """QK-norm + RoPE at (tokens / 4096 sequences of 4096, 16, 128), ours checked first."""
    B, T, N, H = max(1, tokens // 4096), min(tokens, 4096), 16, 128
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (B, T, N, H), jnp.bfloat16) * 2
    scale = 1 + 0.1 * jax.random.normal(k[1], (N, H), jnp.float32)
    dy = jax.random.normal(k[2], x.shape, jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def ours(fused):
        return lambda x, s: rmsnorm_gpu.rms_norm_rope(x, s, pos, 5e5, EPS, jnp.bfloat16,
                                                      fused_forward=fused, interpret=interpret)

    return _compare("qk_norm_rope", (x, scale, dy), impls,
                    xla=lambda x, s: rmsnorm_gpu.apply_rope(
                        rmsnorm_gpu.reference(x, s, EPS, jnp.bfloat16), pos, 5e5),
                    ours=ours(False), ours_fwd=ours(True))


def _compare(name, args, impls, **norms):
    """Forward + backward of each of `norms` (x, scale) -> y on args (x, scale, dy), jitted;
    each of ours checked against XLA's y, dx and dscale first, then a timed row per impl
    (forward + backward, and the forward alone)."""
    def step(norm):
        def f(x, scale, dy):
            y, vjp = jax.vjp(norm, x, scale)
            return (y, *vjp(dy))
        return jax.jit(f)

    steps = {impl: step(norm) for impl, norm in norms.items() if impl in impls or impl == "xla"}
    ref = steps["xla"](*args)
    errs = {impl: [rel_err(a, b) for a, b in zip(f(*args), ref)]
            for impl, f in steps.items() if impl != "xla"}
    for impl, e in errs.items():
        if max(e) > 1e-2:
            raise AssertionError(f"{name} {impl}: max errors (y, dx, dscale) {e} against XLA")
    rows = []
    for impl, f in steps.items():
        if impl not in impls:
            continue
        t = time_fn(f, args)
        t_fwd = time_fn(jax.jit(norms[impl]), args[:2])
        rows.append({"shape": name, "x": list(args[0].shape), "impl": impl,
                     "ms": round(t * 1e3, 4), "fwd_ms": round(t_fwd * 1e3, 4),
                     **({"max_rel_err": [round(x, 6) for x in errs[impl]]} if impl in errs
                        else {})})
    return rows


def sweep(name, x_shape, scale_shape, interpret=False, fwd=False):
    """Our rows at each (rows, max_steps, num_warps) setting of the backward (fwd: of the
    one-pass forward), the tuning restored after."""
    rope = name == "qk_norm_rope"
    tuning = {(False, False): rmsnorm_gpu.TUNING, (True, False): rmsnorm_gpu.ROPE_TUNING,
              (False, True): rmsnorm_gpu.FWD_TUNING, (True, True): rmsnorm_gpu.ROPE_FWD_TUNING}[
        rope, fwd]
    impls = ("ours_fwd",) if fwd else ("ours",)
    saved, rows = dict(tuning), []
    try:
        for r, steps, warps in itertools.product((2, 4, 8, 16), (4, 8), (4, 8, 16)):
            tuning.update(rows=r, max_steps=steps, num_warps=warps)
            if rope:
                row, = bench_rope(x_shape, interpret, impls=impls)
            else:
                row, = bench_shape(name, x_shape, scale_shape, interpret, impls=impls)
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
    ap.add_argument("--sweep-fwd", action="store_true",
                    help="also time ours_fwd at each setting of the one-pass forward")
    ap.add_argument("--only", default="", help="comma-separated shapes (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    only = (set(filter(None, a.only.split(",")))
            or {"post_norm", "post_norm_add", "qk_norm", "qk_norm_rope"})

    def rows():  # produced one by one, so each prints as soon as it is measured
        for name, xs, ss in (("post_norm", (a.tokens, 2048), (2048,)),
                             ("post_norm_add", (a.tokens, 2048), (2048,)),
                             ("qk_norm", (a.tokens, 16, 128), (16, 128))):
            if name not in only:
                continue
            yield from bench_shape(name, xs, ss, a.interpret)
            if a.sweep:
                yield from sweep(name, xs, ss, a.interpret)
            if a.sweep_fwd and name == "post_norm_add":
                yield from sweep(name, xs, ss, a.interpret, fwd=True)
        if "qk_norm_rope" not in only:
            return
        yield from bench_rope(a.tokens, a.interpret)
        if a.sweep:
            yield from sweep("qk_norm_rope", a.tokens, None, a.interpret)
        if a.sweep_fwd:
            yield from sweep("qk_norm_rope", a.tokens, None, a.interpret, fwd=True)

    report(rows(), a.out, tokens=a.tokens)


if __name__ == "__main__":
    main()
