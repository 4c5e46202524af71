"""The fused loss's passes over one chunk of logits at the 1B step's shape: XLA's (the
one-pass logsumexp of olmo2_jax/loss.py, then the softmax gradient) against
kernels/xent_gpu.py, checked against XLA first.

    python bench/xent.py --out=/tmp/xent.json          # a CUDA GPU
    python bench/xent.py --rows=64 --interpret         # anywhere (Pallas interpreter)
    python bench/xent.py --sweep                       # + each tile setting of ours

Rows: "lse" (the logsumexp alone), "grad" (the gradient pass alone, given lse) and "both",
for bf16 logits (rows, vocab), with GB/s over the bytes each must move.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import rel_err, report, time_fn  # noqa: E402
from kernels import xent_gpu  # noqa: E402
from olmo2_jax.loss import logsumexp_one_pass  # noqa: E402

ZW = 1e-5


def _inputs(rows, vocab):
    k = jax.random.split(jax.random.key(0), 3)
    x = (3 * jax.random.normal(k[0], (rows, vocab), jnp.float32)).astype(jnp.bfloat16)
    targets = jax.random.randint(k[1], (rows,), 0, vocab)
    mask = (jax.random.uniform(k[2], (rows,)) > 0.1).astype(jnp.float32)
    return x, targets, mask


def _passes(impl, interpret):
    """(lse, grad, both) jitted functions of one implementation."""
    if impl == "xla":
        lse_fn = lambda x: logsumexp_one_pass(x.astype(jnp.float32))  # noqa: E731
        grad_fn = functools.partial(xent_gpu.reference_softmax_grad, dtype=jnp.bfloat16)
    else:
        lse_fn = lambda x: xent_gpu.logsumexp(x, interpret=interpret)  # noqa: E731
        grad_fn = lambda *a: xent_gpu.softmax_grad(*a, jnp.bfloat16,  # noqa: E731
                                                   interpret=interpret)

    def both(x, targets, mask):
        lse = lse_fn(x)
        return grad_fn(x, lse, (1 + 2 * ZW * lse) * mask, targets, mask)

    return jax.jit(lse_fn), jax.jit(grad_fn), jax.jit(both)


def bench(rows, vocab, interpret=False, impls=("xla", "ours")):
    x, targets, mask = _inputs(rows, vocab)
    ref, ours = (dict(zip(("lse", "grad", "both"), _passes(impl, interpret)))
                 for impl in ("xla", "ours"))
    lse = ref["lse"](x)
    coef = (1 + 2 * ZW * lse) * mask
    args = {"lse": (x,), "grad": (x, lse, coef, targets, mask), "both": (x, targets, mask)}
    nbytes = {"lse": x.nbytes, "grad": 2 * x.nbytes, "both": 3 * x.nbytes}
    errs = {k: rel_err(ours[k](*args[k]), ref[k](*args[k])) for k in ref}
    if max(errs.values()) > 1e-2:
        raise AssertionError(f"max errors {errs} against XLA")
    out = []
    for impl, fns in (("xla", ref), ("ours", ours)):
        if impl not in impls:
            continue
        for k, f in fns.items():
            t = time_fn(f, args[k])
            out.append({"pass": k, "rows": rows, "vocab": vocab, "impl": impl,
                        "ms": round(t * 1e3, 4), "gb_s": round(nbytes[k] / t / 1e9, 1),
                        **({"rel_err": round(errs[k], 6)} if impl == "ours" else {})})
    return out


def sweep(rows, vocab, interpret=False):
    """Our rows at each (rows, cols, num_warps) setting for both passes, TUNING restored."""
    saved, out = {k: dict(v) for k, v in xent_gpu.TUNING.items()}, []
    try:
        for r, c, w in itertools.product((1, 2, 4), (2048, 4096, 8192), (4, 8)):
            for t in xent_gpu.TUNING.values():
                t.update(rows=r, cols=c, num_warps=w)
            if not xent_gpu.supported((rows, vocab)):
                continue
            for row in bench(rows, vocab, interpret, impls=("ours",)):
                if row["pass"] != "both":
                    out.append({**row, "tuning": [r, c, w]})
    finally:
        for k, v in saved.items():
            xent_gpu.TUNING[k].clear()
            xent_gpu.TUNING[k].update(v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192, help="tokens per loss chunk")
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (no GPU)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time ours at each (rows, cols, num_warps) setting")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    def rows():
        yield from bench(a.rows, a.vocab, a.interpret)
        if a.sweep:
            yield from sweep(a.rows, a.vocab, a.interpret)

    report(rows(), a.out, tuning=xent_gpu.TUNING)


if __name__ == "__main__":
    main()
