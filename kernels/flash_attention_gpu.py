"""GPU flash attention kernels on the Pallas Triton lowering: forward, dq, dk/dv.

Layout B,T,N,H throughout (no transposes). Each program owns one query (or key) tile and
loops over the other axis; the loop is split into the blocks strictly below the causal
diagonal (no causal mask) and the diagonal blocks (masked), and blocks above it are never
visited. Softmax runs in base 2 (exp2 with log2(e) folded into the scale); the logsumexp
residual (B,N,T) is kept in base 2 too. GQA: the dk/dv program of a kv head loops over its
group's query heads, so dk/dv are summed in registers, never repeated in memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
# (block_q, block_k, num_warps, num_stages) per kernel; "fwd" tiles (or the caller's
# block_q/block_k) also set the padding. Chosen by the H200 sweeps of bench/attention.py
# (docs/kernels.md); the backward tiles are independent of the forward ones.
# heavy_first: launch the query tiles with the most causal work first (shorter tail).
TUNING = {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 3), "dkv": (64, 128, 8, 3),
          "heavy_first": True}


def block_sizes(T: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """Forward tiles (powers of two, at least 16), shrunk for short sequences."""
    cap = max(16, pl.next_power_of_2(T))
    bq, bk = min(block_q or TUNING["fwd"][0], cap), min(block_k or TUNING["fwd"][1], cap)
    for name, b in (("block_q", bq), ("block_k", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"flash_attention (gpu): {name}={b} must be a power of two >= 16")
    return bq, bk


def _tile(kind, T):
    """Backward tiles, halved until they divide the padded length (a multiple of 16)."""
    q, k, warps, stages = TUNING[kind]
    while T % q:
        q //= 2
    while T % k:
        k //= 2
    return q, k, warps, stages


def _q_block(i, n):
    """Query tile of grid index i out of n (reversed when heavy_first)."""
    return n - 1 - i if TUNING["heavy_first"] else i


def _mask(seg_ref, q_start, k_start, bq, bk, causal):
    mask = None
    if causal:
        mask = (q_start + jnp.arange(bq))[:, None] >= (k_start + jnp.arange(bk))[None, :]
    if seg_ref is not None:
        same = seg_ref[pl.ds(q_start, bq)][:, None] == seg_ref[pl.ds(k_start, bk)][None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, bq, bk):
    q_start = _q_block(pl.program_id(0), pl.num_programs(0)) * bq
    q = q_ref[...]
    H = q.shape[-1]

    def body(kb, carry, causal):
        acc, m, l = carry
        k_start = kb * bk
        k = k_ref[pl.ds(k_start, bk), :]
        s = plgpu.dot(q, k, trans_b=True) * (scale * LOG2E)
        mask = _mask(seg_ref, q_start, k_start, bq, bk, causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_next[:, None])
        alpha = jnp.exp2(m - m_next)
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(k_start, bk), :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l

    carry = (jnp.zeros((bq, H), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    n_full = q_start // bk  # key blocks entirely at or below the diagonal's start
    n_all = lax.div(q_start + bq + bk - 1, bk)
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_all, functools.partial(body, causal=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def forward(q, k, v, seg, *, block_q, block_k, interpret=False):
    """Returns out (B,T,N,H) and the base-2 logsumexp (B,N,T) fp32."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    bq, bk = block_q, block_k
    _, _, warps, stages = TUNING["fwd"]
    kernel = functools.partial(_fwd_kernel, scale=H**-0.5, bq=bq, bk=bk)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, _q_block(i, T // bq), h, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda i, b, h: (b, 0, h // G, 0))
    seg_spec = None if seg is None else pl.BlockSpec((None, T), lambda i, b, h: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(T // bq, B, N),
        in_specs=[q_spec, kv_spec, kv_spec, seg_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, _q_block(i, T // bq)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v, seg)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, di_ref, dq_ref, *, scale, bq, bk):
    q_start = _q_block(pl.program_id(0), pl.num_programs(0)) * bq
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]

    def body(kb, dq, causal):
        k_start = kb * bk
        k, v = k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :]
        s = plgpu.dot(q, k, trans_b=True) * (scale * LOG2E)
        p = jnp.exp2(s - lse[:, None])
        mask = _mask(seg_ref, q_start, k_start, bq, bk, causal)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    n_full = q_start // bk
    n_all = lax.div(q_start + bq + bk - 1, bk)
    dq = lax.fori_loop(0, n_full, functools.partial(body, causal=False), dq)
    dq = lax.fori_loop(n_full, n_all, functools.partial(body, causal=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, *,
                scale, bq, bk, G, T):
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    H = k.shape[-1]

    def body(qb, carry, g, causal):  # transposed tiles: (bk, bq), statistics as rows
        dk, dv = carry
        q_start = qb * bq
        q, do = q_ref[pl.ds(q_start, bq), g, :], do_ref[pl.ds(q_start, bq), g, :]
        lse, di = lse_ref[g, pl.ds(q_start, bq)], di_ref[g, pl.ds(q_start, bq)]
        s_t = plgpu.dot(k, q, trans_b=True) * (scale * LOG2E)
        p_t = jnp.exp2(s_t - lse[None, :])
        mask = _mask(seg_ref, q_start, k_start, bq, bk, causal)
        if mask is not None:
            p_t = jnp.where(mask.T, p_t, 0.0)
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
        dp_t = plgpu.dot(v, do, trans_b=True)
        ds_t = (p_t * (dp_t - di[None, :])).astype(q.dtype)
        dk = dk + plgpu.dot(ds_t, q)
        return dk, dv

    carry = (jnp.zeros((bk, H), jnp.float32), jnp.zeros((bk, H), jnp.float32))
    first = k_start // bq  # first query block reaching this key block
    n_diag = lax.div(k_start + bk + bq - 1, bq)  # query blocks overlapping the diagonal end here
    for g in range(G):
        carry = lax.fori_loop(first, n_diag, functools.partial(body, g=g, causal=True), carry)
        carry = lax.fori_loop(n_diag, T // bq, functools.partial(body, g=g, causal=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq(q, k, v, seg, d_out, lse, di, interpret):
    B, T, N, H = q.shape
    G = N // k.shape[2]
    bq, bk, warps, stages = _tile("dq", T)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, _q_block(i, T // bq), h, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda i, b, h: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, _q_block(i, T // bq)))
    seg_spec = None if seg is None else pl.BlockSpec((None, T), lambda i, b, h: (b, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=H**-0.5, bq=bq, bk=bk),
        grid=(T // bq, B, N),
        in_specs=[q_spec, kv_spec, kv_spec, seg_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, seg, d_out, lse, di)


def backward(q, k, v, seg, out, lse, d_out, *, block_q, block_k, interpret=False):
    """Gradients (dq, dk, dv) in the B,T,N,H / B,S,K,H layout."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = H**-0.5
    di = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))

    del block_q, block_k  # the forward's tiles; the backward kernels have their own
    dq = _dq(q, k, v, seg, d_out, lse, di, interpret)
    bq, bk, warps, stages = _tile("dkv", T)
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, kh: (b, j, kh, 0))
    group_spec = pl.BlockSpec((None, T, G, H), lambda j, b, kh: (b, 0, kh, 0))
    row_spec = pl.BlockSpec((None, G, T), lambda j, b, kh: (b, kh, 0))
    seg_spec = None if seg is None else pl.BlockSpec((None, T), lambda j, b, kh: (b, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, G=G, T=T),
        grid=(T // bk, B, K),
        in_specs=[group_spec, kv_spec, kv_spec, seg_spec, group_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="flash_attention_dkv",
    )(q, k, v, seg, d_out, lse, di)
    return dq, dk, dv
