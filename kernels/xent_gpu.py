"""The fused loss's two passes over a chunk of logits (Pallas, Triton lowering: any CUDA GPU).

    lse[r]    = log sum_v exp(x[r, v])                                   (logsumexp)
    g[r, v]   = exp(x[r, v] - lse[r]) * coef[r] - (v == target[r]) * mask[r]    (softmax_grad)

Why: olmo2_jax/loss.py runs both per chunk of [tokens, vocab] logits. XLA emits the
logsumexp as a variadic row reduce that carries (max, sum) per element, two exps each, and
runs it at ~1 TB/s on the H200 (27 ms of a 2 s step of 32 sequences, docs/performance.md,
tenth session); the gradient pass runs at ~2.6 TB/s. Here each program owns `rows` rows and
walks the vocabulary in tiles of `cols`: the logsumexp rescales its running sum once per
tile (one exp per element), and both passes read x once, at HBM speed.
Rows are independent, so under a mesh each device runs them on its own shard of rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# rows per program, vocabulary columns per tile, warps: one setting per pass.
TUNING = {"lse": {"rows": 4, "cols": 2048, "num_warps": 4},
          "grad": {"rows": 8, "cols": 2048, "num_warps": 8}}
_LOW = float(jnp.finfo(jnp.float32).min)  # a finite "-inf": exp(x - _LOW) never makes nan


def supported(shape) -> bool:
    """(rows, vocab) that both passes tile exactly."""
    R, V = shape
    return all(R % t["rows"] == 0 and V % t["cols"] == 0 for t in TUNING.values())


def reference_logsumexp(x):
    return jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)


def reference_softmax_grad(x, lse, coef, targets, mask, dtype):
    p = jnp.exp(x.astype(jnp.float32) - lse[:, None]) * coef[:, None]
    onehot = targets[:, None] == jnp.arange(x.shape[1], dtype=targets.dtype)[None, :]
    return (p - jnp.where(onehot, mask[:, None], 0.0)).astype(dtype)


def _lse_kernel(x_ref, o_ref, *, rows, cols, tiles):
    r = pl.ds(pl.program_id(0) * rows, rows)

    def body(j, carry):
        m, s = carry
        x = x_ref[r, pl.ds(j * cols, cols)].astype(jnp.float32)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((rows,), _LOW, jnp.float32), jnp.zeros((rows,), jnp.float32))
    m, s = lax.fori_loop(0, tiles, body, init)
    o_ref[r] = m + jnp.log(s)


def _per_shard(fn, row_axes, *args):
    """fn(*args) on one device, or per shard of rows (the leading dim of every argument and of
    the result) under shard_map over the ambient mesh's `row_axes`: a pallas_call is opaque
    to the SPMD partitioner, which would otherwise gather the rows onto every device."""
    if not row_axes:
        return fn(*args)
    spec = lambda a: P(row_axes, *([None] * (a.ndim - 1)))  # noqa: E731
    out = jax.eval_shape(fn, *args)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=tuple(map(spec, args)), out_specs=spec(out),
                         check_vma=False)(*args)


def logsumexp(x, *, row_axes=(), interpret: bool = False):
    """logsumexp over the last axis of x (R, V), fp32 out; x is read once. row_axes: the
    ambient mesh's axes that the rows are split over (none: one device)."""
    return _per_shard(functools.partial(_logsumexp, interpret=interpret), tuple(row_axes), x)


def _logsumexp(x, *, interpret):
    (R, V), t = x.shape, TUNING["lse"]
    kernel = functools.partial(_lse_kernel, rows=t["rows"], cols=t["cols"],
                               tiles=V // t["cols"])
    return pl.pallas_call(
        kernel,
        grid=(R // t["rows"],),
        in_specs=[pl.BlockSpec((R, V), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((R,), lambda i: (0,)),
        out_shape=jax.ShapeDtypeStruct((R,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=t["num_warps"], num_stages=1),
        interpret=interpret,
        name="xent_logsumexp",
    )(x)


def _grad_kernel(x_ref, lse_ref, coef_ref, tgt_ref, mask_ref, g_ref, *, rows, cols, tiles):
    r = pl.ds(pl.program_id(0) * rows, rows)
    lse, coef = lse_ref[r][:, None], coef_ref[r][:, None]
    tgt, mask = tgt_ref[r][:, None], mask_ref[r][:, None]

    def body(j, _):
        c = pl.ds(j * cols, cols)
        p = jnp.exp(x_ref[r, c].astype(jnp.float32) - lse) * coef
        hit = (j * cols + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)) == tgt
        g_ref[r, c] = (p - jnp.where(hit, mask, 0.0)).astype(g_ref.dtype)
        return 0

    lax.fori_loop(0, tiles, body, 0)


def softmax_grad(x, lse, coef, targets, mask, dtype, *, row_axes=(), interpret: bool = False):
    """softmax(x) * coef - onehot(targets) * mask, in `dtype`, for x (R, V) and the rest (R,),
    given lse = logsumexp(x); x is read once. row_axes: as for logsumexp."""
    args = (x, lse.astype(jnp.float32), coef.astype(jnp.float32), targets.astype(jnp.int32),
            mask.astype(jnp.float32))
    fn = functools.partial(_softmax_grad, dtype=jnp.dtype(dtype), interpret=interpret)
    return _per_shard(fn, tuple(row_axes), *args)


def _softmax_grad(x, lse, coef, targets, mask, *, dtype, interpret):
    (R, V), t = x.shape, TUNING["grad"]
    kernel = functools.partial(_grad_kernel, rows=t["rows"], cols=t["cols"],
                               tiles=V // t["cols"])
    whole, vec = pl.BlockSpec((R, V), lambda i: (0, 0)), pl.BlockSpec((R,), lambda i: (0,))
    return pl.pallas_call(
        kernel,
        grid=(R // t["rows"],),
        in_specs=[whole, vec, vec, vec, vec],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((R, V), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=t["num_warps"], num_stages=1),
        interpret=interpret,
        name="xent_softmax_grad",
    )(x, lse, coef, targets, mask)
