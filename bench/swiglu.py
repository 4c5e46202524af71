"""SwiGLU's h = silu(gate) * up, forward + backward at the 1B step's shape: XLA's autodiff
against kernels/swiglu_gpu.py (XLA forward, one-pass Pallas backward), checked first.

    python bench/swiglu.py --out=/tmp/swiglu.json        # a CUDA GPU
    python bench/swiglu.py --tokens=64 --interpret       # anywhere (Pallas interpreter)
    python bench/swiglu.py --sweep                       # + each tile setting of ours
    python bench/swiglu.py --mlp                         # + the MLP's first half, GEMMs included

Rows: (tokens, 8192) bf16, as (batch x seq, mlp_hidden) of OLMo-2-1B; `bwd` rows time the
backward alone (dh given), `fwd+bwd` both. The backward's bytes: 3 reads + 2 writes.
`--mlp` adds x (tokens, 2048) -> silu(x W_gate) * (x W_up), forward + backward with fp32
weight gradients, as the model's MLP runs it (both GEMMs through olmo2_jax.ops.dense):
`xla` (XLA's autodiff of the gate: model.kernels='xla') against `ours` (the one-pass
kernel: model.kernels='auto' on a GPU), checked first.
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
from kernels import swiglu_gpu  # noqa: E402
from olmo2_jax.ops import dense  # noqa: E402


def bench(tokens, F=8192, interpret=False, impls=("xla", "ours")):
    k = jax.random.split(jax.random.key(0), 3)
    gate = jax.random.normal(k[0], (tokens, F), jnp.bfloat16) * 2
    up = jax.random.normal(k[1], (tokens, F), jnp.bfloat16)
    dh = jax.random.normal(k[2], (tokens, F), jnp.bfloat16)

    def steps(fn):
        def both(g, u, dh):
            h, vjp = jax.vjp(fn, g, u)
            return (h, *vjp(dh))

        def bwd(g, u, dh):
            return jax.vjp(fn, g, u)[1](dh)
        return {"fwd+bwd": jax.jit(both), "bwd": jax.jit(bwd)}

    xla = steps(swiglu_gpu.reference)
    ours = steps(lambda g, u: swiglu_gpu.swiglu(g, u, interpret=interpret))
    args = (gate, up, dh)
    # against fp32 autodiff: ours computes in fp32, XLA's bf16 autodiff rounds between steps
    exact = jax.jit(lambda g, u, dh: jax.vjp(swiglu_gpu.reference, g.astype(jnp.float32),
                                             u.astype(jnp.float32))[1](dh.astype(jnp.float32)))
    ref = exact(*args)
    errs = {name: [rel_err(a, b) for a, b in zip(fs["bwd"](*args), ref)]
            for name, fs in (("xla", xla), ("ours", ours))}
    if max(errs["ours"]) > 1e-2:
        raise AssertionError(f"swiglu: ours (dgate, dup) errors {errs['ours']} against fp32")
    rows = []
    for impl, fs in (("xla", xla), ("ours", ours)):
        if impl not in impls:
            continue
        for what, f in fs.items():
            t = time_fn(f, args)
            nbytes = gate.size * 2 * (5 if what == "bwd" else 8)
            rows.append({"what": what, "x": [tokens, F], "impl": impl, "ms": round(t * 1e3, 4),
                         "GB/s": round(nbytes / t / 1e9), "tuning": dict(swiglu_gpu.TUNING),
                         "max_rel_err_vs_fp32": [round(e, 6) for e in errs[impl]]})
    return rows


def bench_mlp(tokens, D=2048, F=8192, interpret=False):
    """The MLP's first half, forward + backward (dx, dW_gate, dW_up): rows per impl with
    TFLOP/s of its 6 GEMMs and the max error against the xla row."""
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (1, tokens, D), jnp.bfloat16)
    wg, wu = (jax.random.normal(kk, (D, F), jnp.float32) * D ** -0.5 for kk in k[1:3])
    dh = jax.random.normal(k[3], (1, tokens, F), jnp.bfloat16)

    def mlp(kernel):
        gate_fn = ((lambda g, u: swiglu_gpu.swiglu(g, u, interpret=interpret)) if kernel
                   else swiglu_gpu.reference)
        return lambda x, wg, wu: gate_fn(dense("BTD,DF->BTF", x, wg, jnp.bfloat16),
                                         dense("BTD,DF->BTF", x, wu, jnp.bfloat16))

    fns = {"xla": mlp(False), "ours": mlp(True)}

    def step(fn):
        def both(x, wg, wu, dh):
            h, vjp = jax.vjp(fn, x, wg, wu)
            return (h, *vjp(dh))
        return jax.jit(both)

    args = (x, wg, wu, dh)
    steps = {name: step(fn) for name, fn in fns.items()}
    ref = steps["xla"](*args)
    rows = []
    for impl, f in steps.items():
        errs = [rel_err(a, b) for a, b in zip(f(*args), ref)]
        if max(errs) > 2e-2:
            raise AssertionError(f"swiglu mlp: {impl} (h, dx, dwg, dwu) errors {errs} vs xla")
        t = time_fn(f, args)
        rows.append({"what": "mlp fwd+bwd", "x": [tokens, D, F], "impl": impl,
                     "ms": round(t * 1e3, 4), "TFLOP/s": round(12 * tokens * D * F / t / 1e12, 1),
                     "max_rel_err_vs_xla": [round(e, 6) for e in errs]})
    return rows


def sweep(tokens, interpret=False):
    """Our rows at each (rows, cols, num_warps) setting, TUNING restored after."""
    saved, rows = dict(swiglu_gpu.TUNING), []
    try:
        for r, c, w in itertools.product((1, 2, 4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048),
                                         (4, 8)):
            if not 2048 <= r * c <= 16384:
                continue
            swiglu_gpu.TUNING.update(rows=r, cols=c, num_warps=w)
            rows += [row for row in bench(tokens, interpret=interpret, impls=("ours",))
                     if row["what"] == "bwd"]
    finally:
        swiglu_gpu.TUNING.clear()
        swiglu_gpu.TUNING.update(saved)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536, help="rows (batch x seq)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (no GPU)")
    ap.add_argument("--sweep", action="store_true", help="also time ours at each tile setting")
    ap.add_argument("--mlp", action="store_true", help="also the MLP's first half, GEMMs in")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    def rows():
        yield from bench(a.tokens, interpret=a.interpret)
        if a.mlp:
            yield from bench_mlp(a.tokens, interpret=a.interpret)
        if a.sweep:
            yield from sweep(a.tokens, a.interpret)

    report(rows(), a.out, tokens=a.tokens)


if __name__ == "__main__":
    main()
