"""Mosaic TPU flash attention kernels: forward, dq and dk/dv, causal, GQA, segment ids.

Layout inside is B,N,T,H (a (block, head_dim) tile is the natural VMEM tile). The kv (or q)
sweep is the last, sequential grid axis with fp32 accumulators in VMEM scratch; blocks above
the causal diagonal are skipped and their index maps clamped so no DMA is issued for them.
GQA: K/V blocks are indexed by query head // group; the dk/dv kernel sweeps the group's query
heads and q blocks on its sequential axis, so dk/dv are summed in VMEM, never repeated in HBM.
Row statistics (logsumexp, rowsum(dO*O)) are stored broadcast over 128 lanes as Mosaic wants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def block_sizes(T: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """Default 512 x 512 tiles, shrunk (in steps of 128 lanes) for short sequences."""
    cap = -(-T // LANES) * LANES
    bq, bk = min(block_q or 512, cap), min(block_k or 512, cap)
    for name, b in (("block_q", bq), ("block_k", bk)):
        if b % LANES:
            raise ValueError(f"flash_attention (tpu): {name}={b} must be a multiple of {LANES}")
    return bq, bk


def _lanes(x_BNT):
    return jnp.broadcast_to(x_BNT[..., None], (*x_BNT.shape, LANES))


def _fit(x, width):
    """(rows, 128) lane-broadcast statistic -> (rows, width)."""
    if width == LANES:
        return x
    if width < LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // LANES))


def _mask(qseg_ref, kvseg_ref, q_start, k_start, bq, bk):
    row = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + q_start
    col = lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + k_start
    mask = col <= row
    if qseg_ref is not None:
        same = _fit(qseg_ref[...], bk) == kvseg_ref[:1, :]
        mask = jnp.logical_and(mask, same)
    return mask


def _seg_specs(seg, bq, bk, q_map, k_map):
    """Segment ids as (B,T,128) for query tiles and (B,8,T) for key tiles."""
    if seg is None:
        return [], []
    B, T = seg.shape
    q_seg = jnp.broadcast_to(seg[:, :, None], (B, T, LANES))
    kv_seg = jnp.broadcast_to(seg[:, None, :], (B, SUBLANES, T))
    specs = [pl.BlockSpec((None, bq, LANES), q_map), pl.BlockSpec((None, SUBLANES, bk), k_map)]
    return [q_seg, kv_seg], specs


def _split_seg_refs(refs, has_seg):
    """(q segment ref, kv segment ref, the other refs): the segment refs lead when present."""
    return (refs[0], refs[1], refs[2:]) if has_seg else (None, None, refs)


def _fwd_kernel(*refs, has_seg, scale, bq, bk, nk):
    qseg_ref, kvseg_ref, refs = _split_seg_refs(refs, has_seg)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(ki * bk <= qi * bq + bq - 1)
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
        s = jnp.where(_mask(qseg_ref, kvseg_ref, qi * bq, ki * bk, bq, bk), s * scale, MASK_VALUE)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
        p = jnp.exp(s - _fit(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _fit(alpha, acc_sc.shape[1]) + pv

    @pl.when(ki == nk - 1)
    def _store():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / _fit(l, acc_sc.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(q_BTNH, k_BSKH, v_BSKH, seg_BT, *, block_q, block_k, interpret=False):
    """Returns out (B,T,N,H) and the lane-broadcast logsumexp (B,N,T,128) fp32."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSKH, v_BSKH))
    B, N, T, H = q.shape
    G = N // k.shape[1]
    bq, bk = block_q, block_k
    nq, nk = T // bq, T // bk

    def kv_block(qi, ki):  # clamp to the last block at or below the diagonal: no extra DMA
        return jnp.minimum(ki, lax.div(qi * bq + bq - 1, bk))

    seg_in, seg_specs = _seg_specs(seg_BT, bq, bk, lambda b, h, qi, ki: (b, qi, 0),
                                   lambda b, h, qi, ki: (b, 0, kv_block(qi, ki)))
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, h, qi, ki: (b, h, qi, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, qi, ki: (b, lax.div(h, G), kv_block(qi, ki), 0))
    lse_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, qi, ki: (b, h, qi, 0))
    kernel = functools.partial(_fwd_kernel, has_seg=seg_BT is not None, scale=H**-0.5,
                               bq=bq, bk=bk, nk=nk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, N, nq, nk),
        in_specs=seg_specs + [q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, H), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_attention_fwd",
    )(*seg_in, q, k, v)
    return out.transpose(0, 2, 1, 3), lse


def _dq_kernel(*refs, has_seg, scale, bq, bk, nk):
    qseg_ref, kvseg_ref, refs = _split_seg_refs(refs, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc = refs
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(ki * bk <= qi * bq + bq - 1)
    def _step():
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        mask = _mask(qseg_ref, kvseg_ref, qi * bq, ki * bk, bq, bk)
        p = jnp.where(mask, jnp.exp(s - _fit(lse_ref[...], bk)), 0.0)
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _fit(di_ref[...], bk))
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == nk - 1)
    def _store():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, has_seg, scale, bq, bk, nq):
    qseg_ref, kvseg_ref, refs = _split_seg_refs(refs, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    ki, j = pl.program_id(2), pl.program_id(3)
    qi = lax.rem(j, nq)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(qi * bq + bq - 1 >= ki * bk)
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        mask = _mask(qseg_ref, kvseg_ref, qi * bq, ki * bk, bq, bk)
        p = jnp.where(mask, jnp.exp(s - _fit(lse_ref[...], bk)), 0.0)  # (bq, bk)
        dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _fit(di_ref[...], bk))
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q_BTNH, k_BSKH, v_BSKH, seg_BT, out_BTNH, lse, d_out_BTNH, *, block_q, block_k,
             interpret=False):
    """Gradients (dq, dk, dv) in the B,T,N,H / B,S,K,H layout."""
    q, k, v, do = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSKH, v_BSKH, d_out_BTNH))
    B, N, T, H = q.shape
    K = k.shape[1]
    G = N // K
    bq, bk = block_q, block_k
    nq, nk = T // bq, T // bk
    di = jnp.einsum("BTNH,BTNH->BNT", out_BTNH.astype(jnp.float32), d_out_BTNH.astype(jnp.float32))
    di = _lanes(di)
    has_seg = seg_BT is not None
    interp = pltpu.InterpretParams() if interpret else False

    # dq: grid (B, N, q block, kv block), kv sequential.
    def kv_block(qi, ki):
        return jnp.minimum(ki, lax.div(qi * bq + bq - 1, bk))

    seg_in, seg_specs = _seg_specs(seg_BT, bq, bk, lambda b, h, qi, ki: (b, qi, 0),
                                   lambda b, h, qi, ki: (b, 0, kv_block(qi, ki)))
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, h, qi, ki: (b, h, qi, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, qi, ki: (b, lax.div(h, G), kv_block(qi, ki), 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, qi, ki: (b, h, qi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_seg=has_seg, scale=H**-0.5, bq=bq, bk=bk, nk=nk),
        grid=(B, N, nq, nk),
        in_specs=seg_specs + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interp,
        name="flash_attention_dq",
    )(*seg_in, q, k, v, do, lse, di)

    # dk/dv: grid (B, K, kv block, G * q block); the last axis sweeps the group's query heads.
    def q_block(ki, j):  # clamp the blocks above the diagonal to the first one needed
        return jnp.maximum(lax.rem(j, nq), lax.div(ki * bk, bq))

    def head(kh, j):
        return kh * G + lax.div(j, nq)

    seg_in, seg_specs = _seg_specs(seg_BT, bq, bk, lambda b, kh, ki, j: (b, q_block(ki, j), 0),
                                   lambda b, kh, ki, j: (b, 0, ki))
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, kh, ki, j: (b, head(kh, j), q_block(ki, j), 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, kh, ki, j: (b, kh, ki, 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES),
                            lambda b, kh, ki, j: (b, head(kh, j), q_block(ki, j), 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_seg=has_seg, scale=H**-0.5, bq=bq, bk=bk, nq=nq),
        grid=(B, K, nk, G * nq),
        in_specs=seg_specs + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interp,
        name="flash_attention_dkv",
    )(*seg_in, q, k, v, do, lse, di)
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
