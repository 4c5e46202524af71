"""Hopper (sm90) flash attention on Pallas Mosaic GPU: warp-specialized, TMA-fed kernels.

The FlashAttention-3 structure: each CTA runs three warpgroups. One producer warpgroup
issues TMA copies of K/V tiles into a ring of shared-memory slots and waits on "consumed"
barriers before refilling a slot; two consumer warpgroups each own `bq` query rows and
run wgmma (QK^T, then PV with P from registers) with fp32 softmax statistics. Each
consumer issues S_j = Q K_j^T together with O += P_{j-1} V_{j-1} and runs the softmax of
S_j while that PV matmul is in flight (intra-warpgroup pipelining; `TUNING["fwd_overlap"]`
= False selects the older ping-pong of the two consumers instead). The backward is one
key-resident kernel (K/V rows resident, Q/dO streamed) that forms dK and dV in registers
and adds dQ tiles into an fp32 buffer by TMA reduce-add; `TUNING["bwd"] = "two_kernel"`
selects a dq kernel (which also computes delta = rowsum(O * dO)) plus a dk/dv kernel.

Causal: key tiles above a warpgroup's rows are never loaded or computed, the tiles below
the diagonal run without a mask, and the CTAs with the most work are launched first.
GQA: a query head reads the K/V of its group's kv head, never repeated in memory. Layout
B,T,N,H in and out (TMA reads the strided head slices directly). The logsumexp residual
is base 2 (B,N,T), the contract of `flash_attention_gpu`. Runs on Hopper GPUs only (TMA,
wgmma), bf16, no segment ids: `flash_attention(..., backend="mgpu")`, which sends the
calls these kernels cannot serve to the Triton-lowered ones.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
# fwd: (query rows per consumer warpgroup, key rows per tile, ring depth); a CTA covers two
# warpgroups' rows. dq: the same for the dq kernel. dkv: (key rows per warpgroup, query rows
# per tile, ring depth). *_pingpong: alternate the backward's consumers as in the forward.
# Chosen by the H200 sweeps of bench/attention.py and bench/attention_parts.py
# (docs/kernels.md); 64 rows per warpgroup keep the fp32 accumulators within 232 registers.
TUNING = {"fwd": (64, 128, 2), "dq": (64, 64, 2), "dkv": (64, 64, 2),
          "dq_pingpong": False, "dkv_pingpong": False, "bwd": "fused",
          "fused_dq_overlap": True, "fwd_overlap": True}
# bwd: "fused" (one kernel, dQ added in fp32 with TMA reduce-add; uses the "dkv" tiles) or
# "two_kernel" (dq kernel + dk/dv kernel). On the H200 (2026-11-29 14:09, bench/attention.py
# at B8 T4096) forward + backward ran at 464.6 TFLOP/s with the fused backward, 440.1 with
# the two kernels (cuDNN 457.1 / 455.9): the fused kernel alone is slower (3.17 vs 1.38 +
# 1.79 ms), but it drops the dq kernel's recomputed matmuls and chains better.
# fused_dq_overlap: the fused kernel stores dQ while dK's matmul runs (FA3's order; 3.21 vs
# 3.29 ms) instead of after all three of a tile's gradient matmuls.
# fwd_overlap: each forward tile's softmax runs under the previous tile's PV matmul (FA3's
# intra-warpgroup pipelining; 0.947 vs 0.996 ms) instead of the two consumers' ping-pong.


def _plgpu():
    # Imported on use: the Mosaic GPU dialect is only needed when a kernel is built.
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def _t(ref):
    """Transposed view of a 2-D shared-memory ref: the K^T / Q^T / V^T / dO^T operands."""
    return ref.transpose((1, 0))


def _meet(barrier):
    """Both consumer warpgroups reach this point (a 2-arrival barrier)."""
    plgpu = _plgpu()
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _produce(load, total, stages, free, registers=40):
    """The producer warpgroup's loop: fill the ring, then refill a slot once both consumers
    have released it (`free` barriers). load(step, slot) issues that step's TMA copies."""
    plgpu = _plgpu()
    plgpu.set_max_registers(registers, action="decrease")
    for i in range(stages):
        pl.when(i < total)(functools.partial(load, i, i))

    @pl.loop(stages, total)
    def _(j):
        slot = lax.rem(j, jnp.int32(stages))
        for bar in free:
            plgpu.barrier_wait(bar.at[slot])
        load(j, slot)


def _kv_loader(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, kvh, bk):
    """load(step, slot) for K/V tiles of bk rows of kv head kvh, batch b."""
    plgpu = _plgpu()

    def load(j, slot):
        rows = (b, pl.ds(j * bk, bk), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])
    return load


def _q_do_producer(refs, smem, bars, free, b, kvh, G, first, n_steps, bq, stages,
                   registers=40):
    """The producer of the backward's key-resident kernels: step t streams query tile
    first + t % n_steps of query head kvh * G + t // n_steps (Q, dO, lse and delta)."""
    plgpu = _plgpu()
    q_ref, do_ref, lse_ref, di_ref = refs
    q_smem, do_smem, lse_smem, di_smem = smem
    q_bar, do_bar, row_bar = bars

    def load(t, slot):
        i = first + lax.rem(t, n_steps)
        h = kvh * G + lax.div(t, n_steps)
        rows = (b, pl.ds(i * bq, bq), h)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
        cols = (b, h, pl.ds(i * bq, bq))
        plgpu.copy_gmem_to_smem(lse_ref.at[cols], lse_smem.at[slot], row_bar.at[slot])
        plgpu.copy_gmem_to_smem(di_ref.at[cols], di_smem.at[slot], row_bar.at[slot])
    _produce(load, G * n_steps, stages, free, registers)


def _p_ds(s_t, dp_t, lse_ref, di_ref, q0, k0, scale, masked, dtype):
    """P^T and dS^T (bf16) of a key x query tile from S^T and dP^T (fp32 accumulators),
    the tile's lse and delta rows, and the causal mask where the tile crosses the diagonal
    (query q0 + c sees key k0 + r iff q0 + c >= k0 + r)."""
    plgpu = _plgpu()
    lse = plgpu.load(lse_ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
    di = plgpu.load(di_ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
    p_t = jnp.exp2(s_t * (scale * LOG2E) - lax.broadcast_in_dim(lse, s_t.shape, [1]))
    if masked:
        r = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
        c = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=plgpu.Layout.WGMMA)
        p_t = jnp.where(c + q0 >= r + k0, p_t, 0.0)
    ds_t = (p_t * (dp_t - lax.broadcast_in_dim(di, dp_t.shape, [1]))).astype(dtype)
    return p_t.astype(dtype), ds_t


def _own_kv(k_ref, v_ref, k_smem2, v_smem2, kv_bar, wg, cta_k0, bk, b, kvh):
    """A consumer of a key-resident kernel loads its bk keys (from cta_k0 + wg * bk) and
    values once: (its K tile, its V tile, first key, their rows in global memory)."""
    plgpu = _plgpu()
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    k0 = cta_k0 + wg * bk
    rows = (b, pl.ds(k0, bk), kvh)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_bar.at[wg])
    plgpu.barrier_wait(kv_bar.at[wg])
    return k_smem, v_smem, k0, rows


def _write_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, rows, scale):
    """dK (scaled) and dV out through the K/V tiles' shared memory."""
    plgpu = _plgpu()
    k_smem[...] = (dk * scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)


def block_sizes(T: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """(CTA query rows, key rows): the padding unit of `flash_attention`."""
    del T
    bq_wg, bk, _ = TUNING["fwd"]
    block_q, block_k = block_q or 2 * bq_wg, block_k or bk
    if block_q != 128 or block_k not in (64, 128):
        raise ValueError(f"flash_attention (mgpu): block_q={block_q}, block_k={block_k}; the "
                         "Mosaic GPU kernels take block_q=128 (two warpgroups of 64 rows) and "
                         "block_k 64 or 128")
    return block_q, block_k


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, bars, consumed, sched, *,
                bq, bk, stages, G, n_q_tiles, scale):
    plgpu = _plgpu()
    H = q_ref.shape[-1]
    dtype = q_ref.dtype
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    qo_smem2, k_smem, v_smem, lse_smem2 = smem
    k_bar, v_bar, q_bar = bars
    k_free, v_free = consumed
    tile = n_q_tiles - 1 - lax.axis_index("q_tile")  # heaviest causal tiles first
    cta_q0 = tile * (2 * bq)
    cta_kv_steps = lax.div(cta_q0 + 2 * bq + bk - 1, jnp.int32(bk))
    overlap = TUNING["fwd_overlap"]  # consumers and producer follow the same schedule

    sched_sync = functools.partial(_meet, sched)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        q0 = cta_q0 + wg * bq
        kv_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk))
        full_steps = lax.div(q0, jnp.int32(bk))  # key tiles wholly at or below row q0
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qo_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((bq, H), 0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(k_bar.at[0])  # every warpgroup has at least one key tile
        if not overlap:
            pl.when(wg == 1)(sched_sync)

        def step(j, carry, masked):
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, _t(k_smem.at[slot]))
                sched_sync()
                return acc_ref[...]
            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * (scale * LOG2E)
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(rows + q0 >= cols + j * bk, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(sched)  # softmax done
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_wait(sched)  # the other warpgroup has issued its matmul

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = j + 1

                @pl.when(nxt < kv_steps)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        if overlap:
            acc, m, l = _fwd_overlapped(qo_smem, k_smem, v_smem, k_bar, v_bar, k_free, v_free,
                                        acc, m, l, q0=q0, kv_steps=kv_steps,
                                        full_steps=full_steps, bq=bq, bk=bk, stages=stages,
                                        scale=scale, dtype=dtype)
        else:
            carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False),
                                  (acc, m, l))
            acc, m, l = lax.fori_loop(full_steps, kv_steps,
                                      functools.partial(step, masked=True), carry)

        def flush(j, _):
            # Tiles only the other warpgroup needs: release them and keep the ping-pong.
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            if not overlap:
                sched_sync()
                sched_sync()
        lax.fori_loop(kv_steps, cta_kv_steps, flush, None)
        if not overlap:
            pl.when(wg == 0)(sched_sync)

        inv_l = 1.0 / l
        qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        kvh = lax.div(h, jnp.int32(G))
        if overlap:
            _produce_v_lagged(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, b,
                              kvh, bk, cta_kv_steps, stages)
        else:
            load = _kv_loader(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, kvh, bk)
            _produce(load, cta_kv_steps, stages, (k_free, v_free))


def _produce_v_lagged(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, b, kvh, bk,
                      total, stages):
    """The pipelined forward's producer: step j loads K_j and V_{j-1}, each once its own slot
    is free, as the consumers use them (V a step after K; a shared K+V slot would hold K_j
    back until PV_{j-2} finishes)."""
    plgpu = _plgpu()
    plgpu.set_max_registers(40, action="decrease")

    def load(ref, smem, bar, free, j):
        slot = lax.rem(j, jnp.int32(stages))
        pl.when(j >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
        plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(j * bk, bk), kvh], smem.at[slot], bar.at[slot])

    @pl.loop(0, total + 1)
    def _(j):
        pl.when(j < total)(lambda: load(k_ref, k_smem, k_bar, k_free, j))
        pl.when(j >= 1)(lambda: load(v_ref, v_smem, v_bar, v_free, j - 1))


def _fwd_overlapped(q_smem, k_smem, v_smem, k_bar, v_bar, k_free, v_free, acc, m, l, *,
                    q0, kv_steps, full_steps, bq, bk, stages, scale, dtype):
    """A consumer's key loop with FA3's intra-warpgroup pipelining: step j issues S_j = Q K_j^T
    and O += P_{j-1} V_{j-1} together and runs the softmax of S_j while the PV matmul is in
    flight; O is rescaled before the next PV is issued. Returns (O, m, l) un-normalised.
    The two consumers run free: FA3's ping-pong on top (a turn barrier per consumer around
    the issue) measured slower on the H200 (docs/kernels.md)."""
    plgpu = _plgpu()
    c = scale * LOG2E  # m is kept in units of c * S, so p = exp2(S c - m) is one FMA
    zeros_s = plgpu.layout_cast(jnp.full((bq, bk), 0, jnp.float32), plgpu.Layout.WGMMA)

    def softmax(s, j, m, l, masked):
        if masked:
            r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
            col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(r + q0 >= col + j * bk, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        return p, m_new, l * alpha + p.sum(axis=1), alpha

    def first(s_ref):  # tile 0 (masked: it may cross the diagonal)
        plgpu.wgmma(s_ref, q_smem, _t(k_smem.at[0]))
        return s_ref[...]
    s = pl.run_scoped(first, plgpu.ACC((bq, bk), jnp.float32))
    plgpu.barrier_arrive(k_free.at[0])
    p, m, l, alpha = softmax(s, 0, m, l, masked=True)
    p = p.astype(dtype)

    def step(j, carry, masked):
        acc, m, l, p, alpha = carry
        slot = lax.rem(j, jnp.int32(stages))
        prev = lax.rem(j - 1, jnp.int32(stages))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[prev])

        def body(refs):
            # P_j stays fp32 until PV_{j-1} is done: writing the bf16 registers that PV_{j-1}
            # reads (the loop carry) would make ptxas serialize the wgmmas (C7513)
            s_ref, o_ref, p_ref, m_ref, l_ref, a_ref = refs
            plgpu.wgmma(s_ref, q_smem, _t(k_smem.at[slot]))
            plgpu.wgmma(o_ref, p, v_smem.at[prev])
            s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # PV still in flight
            plgpu.barrier_arrive(k_free.at[slot])
            p_ref[...], m_ref[...], l_ref[...], a_ref[...] = softmax(
                s, j, m_ref[...], l_ref[...], masked)
        _, acc, p32, m, l, alpha = pl.run_state(body)(
            (plgpu.ACC.init(zeros_s), plgpu.ACC.init(acc), zeros_s, m, l, alpha))
        plgpu.barrier_arrive(v_free.at[prev])
        return acc, m, l, p32.astype(dtype), alpha

    carry = (acc, m, l, p, alpha)
    carry = lax.fori_loop(1, jnp.maximum(full_steps, 1),
                          functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(jnp.maximum(full_steps, 1), kv_steps,
                          functools.partial(step, masked=True), carry)
    acc, m, l, p, alpha = carry
    last = lax.rem(kv_steps - 1, jnp.int32(stages))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    plgpu.barrier_wait(v_bar.at[last])

    def final_pv(o_ref):
        plgpu.wgmma(o_ref, p, v_smem.at[last])
    acc = pl.run_state(final_pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[last])
    return acc, m, l


def forward(q, k, v, seg, *, block_q, block_k, interpret=False):
    """out (B,T,N,H) and the base-2 logsumexp (B,N,T) fp32; T a multiple of both tiles."""
    if seg is not None or interpret:
        raise NotImplementedError("mgpu kernels: no segment ids / interpret mode")
    plgpu = _plgpu()
    B, T, N, H = q.shape
    G = N // k.shape[2]
    bq, bk, stages = block_q // 2, block_k, TUNING["fwd"][2]
    stages = max(1, min(stages, T // bk))
    n_q_tiles = T // block_q
    swizzle = _swizzle()
    scratch = (
        (plgpu.SMEM((2, bq, H), q.dtype, transforms=swizzle),
         plgpu.SMEM((stages, bk, H), q.dtype, transforms=swizzle),
         plgpu.SMEM((stages, bk, H), q.dtype, transforms=swizzle),
         plgpu.SMEM((2, bq), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
    )
    kernel = functools.partial(_fwd_kernel, bq=bq, bk=bk, stages=stages, G=G,
                               n_q_tiles=n_q_tiles, scale=H**-0.5)
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, N, T), jnp.float32))
    return _launch(kernel, out_type, scratch, (N, B, n_q_tiles),
                   ("heads", "batch", "q_tile"))(q, k, v)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dq_ref, di_ref, smem, bars,
               consumed, sched, *, bq, bk, stages, G, n_q_tiles, scale, pingpong):
    """dQ for two warpgroups of bq query rows; also writes delta = rowsum(O * dO), computed
    from the tiles it loads anyway, for the dk/dv kernel."""
    plgpu = _plgpu()
    H = q_ref.shape[-1]
    dtype = q_ref.dtype
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    q_smem2, do_smem2, lse_smem2, di_smem2, k_smem, v_smem = smem
    k_bar, v_bar, row_bar, q_bar = bars
    k_free, v_free = consumed
    tile = n_q_tiles - 1 - lax.axis_index("q_tile")
    cta_q0 = tile * (2 * bq)
    kv_steps = lax.div(cta_q0 + 2 * bq + bk - 1, jnp.int32(bk))  # same range for both groups

    sched_sync = functools.partial(_meet, sched)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        lse_smem, di_smem = lse_smem2.at[wg], di_smem2.at[wg]
        q0 = cta_q0 + wg * bq
        rows = (b, pl.ds(q0, bq), h)
        # O passes through Q's buffer (shared memory is full): delta first, then Q.
        plgpu.copy_gmem_to_smem(o_ref.at[rows], q_smem, row_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, row_bar.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q0, bq)], lse_smem, row_bar.at[wg])
        plgpu.barrier_wait(row_bar.at[wg])
        o = plgpu.load(q_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        d_o = plgpu.load(do_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        di = (o * d_o).sum(axis=1)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_bar.at[wg])
        lse = plgpu.load(lse_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
        di_smem[...] = di
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(di_smem, di_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.barrier_wait(q_bar.at[wg])
        dq = plgpu.layout_cast(jnp.full((bq, H), 0, jnp.float32), plgpu.Layout.WGMMA)
        full_steps = lax.div(q0, jnp.int32(bk))

        zeros_s = plgpu.layout_cast(jnp.full((bq, bk), 0, jnp.float32), plgpu.Layout.WGMMA)

        def step(j, dq, masked):
            slot = lax.rem(j, jnp.int32(stages))
            k_s, v_s = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])

            def s_dp(refs):  # S = Q K^T and dP = dO V^T, issued together
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, q_smem, _t(k_s))
                plgpu.wgmma(dp_ref, do_smem, _t(v_s))
                if pingpong:
                    sched_sync()
            s, dp = pl.run_state(s_dp)((plgpu.ACC.init(zeros_s), plgpu.ACC.init(zeros_s)))
            plgpu.barrier_arrive(v_free.at[slot])
            p = jnp.exp2(s * (scale * LOG2E) - lax.broadcast_in_dim(lse, s.shape, [0]))
            if masked:
                r = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                p = jnp.where(r + q0 >= c + j * bk, p, 0.0)
            ds = (p * (dp - lax.broadcast_in_dim(di, dp.shape, [0]))).astype(dtype)
            if pingpong:
                sched_sync()

            def dqk(acc_ref):
                plgpu.wgmma(acc_ref, ds, k_s)
            dq = pl.run_state(dqk)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        if pingpong:
            pl.when(wg == 1)(sched_sync)
        dq = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(full_steps, kv_steps, functools.partial(step, masked=True), dq)
        if pingpong:
            pl.when(wg == 0)(sched_sync)
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        kvh = lax.div(h, jnp.int32(G))
        load = _kv_loader(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, b, kvh, bk)
        _produce(load, kv_steps, stages, (k_free, v_free))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, smem, bars,
                consumed, sched, *, bq, bk, stages, G, n_q_blocks, scale, pingpong):
    """Two warpgroups of bk key rows each; both sweep the same query tiles (from the first
    one that reaches the CTA's keys), so the producer's ring stays in lockstep. With
    pingpong, a shared barrier alternates them as in the forward."""
    plgpu = _plgpu()
    H = q_ref.shape[-1]
    dtype = q_ref.dtype
    b, kvh = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    k_smem2, v_smem2, q_smem, do_smem, lse_smem, di_smem = smem
    kv_bar, q_bar, do_bar, row_bar = bars
    q_free, do_free = consumed
    cta_k0 = lax.axis_index("kv_tile") * (2 * bk)  # early keys see the most queries: first

    sched_sync = functools.partial(_meet, sched)
    first = lax.div(cta_k0, jnp.int32(bq))  # first query tile reaching the CTA's keys
    n_steps = n_q_blocks - first  # per query head of the group

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        k_smem, v_smem, k0, rows = _own_kv(k_ref, v_ref, k_smem2, v_smem2, kv_bar, wg, cta_k0,
                                           bk, b, kvh)
        zeros = plgpu.layout_cast(jnp.full((bk, H), 0, jnp.float32), plgpu.Layout.WGMMA)
        # query tiles [first, unmasked) touch this group's diagonal and are masked
        unmasked = lax.div(k0 + bk - 1 + bq - 1, jnp.int32(bq))

        zeros_t = plgpu.layout_cast(jnp.full((bk, bq), 0, jnp.float32), plgpu.Layout.WGMMA)

        def step(i, carry, g, masked):
            dk, dv = carry
            t = g * n_steps + i - first
            slot = lax.rem(t, jnp.int32(stages))
            q_s, do_s = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_bar.at[slot])
            plgpu.barrier_wait(do_bar.at[slot])

            def s_dp(refs):  # S^T = K Q^T and dP^T = V dO^T, issued together
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, k_smem, _t(q_s))
                plgpu.wgmma(dp_ref, v_smem, _t(do_s))
                if pingpong:
                    sched_sync()
            s_t, dp_t = pl.run_state(s_dp)((plgpu.ACC.init(zeros_t), plgpu.ACC.init(zeros_t)))
            plgpu.barrier_wait(row_bar.at[slot])
            p_t, ds_t = _p_ds(s_t, dp_t, lse_smem.at[slot], di_smem.at[slot], i * bq, k0,
                              scale, masked, dtype)
            if pingpong:
                sched_sync()

            def dv_dk(refs):  # dV += P^T dO and dK += dS^T Q, issued together
                dv_ref, dk_ref = refs
                plgpu.wgmma(dv_ref, p_t, do_s)
                plgpu.wgmma(dk_ref, ds_t, q_s)
            dv, dk = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            plgpu.barrier_arrive(do_free.at[slot])
            plgpu.barrier_arrive(q_free.at[slot])
            return dk, dv

        if pingpong:
            pl.when(wg == 1)(sched_sync)
        own_first = lax.div(k0, jnp.int32(bq))  # tiles before it are above this group's keys

        def skip(i, _, g):
            # Waits too: each barrier_wait advances this warpgroup's view of the phase.
            slot = lax.rem(g * n_steps + i - first, jnp.int32(stages))
            plgpu.barrier_wait(q_bar.at[slot])
            plgpu.barrier_wait(do_bar.at[slot])
            plgpu.barrier_wait(row_bar.at[slot])
            plgpu.barrier_arrive(do_free.at[slot])
            plgpu.barrier_arrive(q_free.at[slot])
            if pingpong:
                sched_sync()
                sched_sync()

        carry = (zeros, zeros)
        for g in range(G):
            lax.fori_loop(first, own_first, functools.partial(skip, g=g), None)
            carry = lax.fori_loop(own_first, unmasked,
                                  functools.partial(step, g=g, masked=True), carry)
            carry = lax.fori_loop(unmasked, n_q_blocks,
                                  functools.partial(step, g=g, masked=False), carry)
        if pingpong:
            pl.when(wg == 0)(sched_sync)
        dk, dv = carry
        _write_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, rows, scale)

    pl.when(wg == 2)(lambda: _q_do_producer(
        (q_ref, do_ref, lse_ref, di_ref), (q_smem, do_smem, lse_smem, di_smem),
        (q_bar, do_bar, row_bar), (q_free, do_free), b, kvh, G, first, n_steps, bq, stages))


def backward(q, k, v, seg, out, lse, d_out, *, block_q, block_k, interpret=False):
    """Gradients (dq, dk, dv): the fused kernel, or a dq and a dk/dv kernel (TUNING["bwd"]);
    GQA summed in registers either way."""
    if seg is not None or interpret:
        raise NotImplementedError("mgpu kernels: no segment ids / interpret mode")
    del block_q, block_k  # the forward's tiles; the backward kernels have their own
    if TUNING["bwd"] == "fused":
        return _bwd_fused(q, k, v, d_out, out, lse)
    dq, di = _dq(q, k, v, d_out, out, lse)
    dk, dv = _dkv(q, k, v, d_out, lse, di)
    return dq, dk, dv


def _swizzle():
    plgpu = _plgpu()
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _launch(kernel, out_type, scratch, grid, grid_names):
    """A CTA of three warpgroups ("wg" 0, 1: consumers; 2: producer) per grid point."""
    plgpu = _plgpu()
    # the kernel's name in profiles (Pallas names it after its body): a partial would be
    # "anonymous", which bench/kernel_profile cannot class as attention
    kernel.__name__ = "flash_attention" + kernel.func.__name__
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=grid_names, num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True))


def _dq(q, k, v, d_out, out, lse):
    plgpu = _plgpu()
    B, T, N, H = q.shape
    G = N // k.shape[2]
    swz = _swizzle()
    bq, bk, stages = TUNING["dq"]
    stages = max(1, min(stages, T // bk))
    return _launch(
        functools.partial(_dq_kernel, bq=bq, bk=bk, stages=stages, G=G,
                          n_q_tiles=T // (2 * bq), scale=H**-0.5,
                          pingpong=TUNING["dq_pingpong"]),
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        (
            (plgpu.SMEM((2, bq, H), q.dtype, transforms=swz),
             plgpu.SMEM((2, bq, H), q.dtype, transforms=swz),
             plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
             plgpu.SMEM((stages, bk, H), q.dtype, transforms=swz),
             plgpu.SMEM((stages, bk, H), q.dtype, transforms=swz)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_arrivals=3, num_barriers=2),  # O, dO, lse copies
             plgpu.Barrier(num_barriers=2)),  # Q
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
        ),
        (N, B, T // (2 * bq)), ("heads", "batch", "q_tile"),
    )(q, k, v, d_out, out, lse)


def _dkv(q, k, v, d_out, lse, di):
    plgpu = _plgpu()
    B, T, N, H = q.shape
    K = k.shape[2]
    swz = _swizzle()
    bk, bq, stages = TUNING["dkv"]
    stages = max(1, min(stages, T // bq))
    return _launch(
        functools.partial(_dkv_kernel, bq=bq, bk=bk, stages=stages, G=N // K,
                          n_q_blocks=T // bq, scale=H**-0.5,
                          pingpong=TUNING["dkv_pingpong"]),
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        (
            (plgpu.SMEM((2, bk, H), q.dtype, transforms=swz),
             plgpu.SMEM((2, bk, H), q.dtype, transforms=swz),
             plgpu.SMEM((stages, bq, H), q.dtype, transforms=swz),
             plgpu.SMEM((stages, bq, H), q.dtype, transforms=swz),
             plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=2),  # k and v copies
             plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)),  # lse and delta copies
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
        ),
        (K, B, T // (2 * bk)), ("heads", "batch", "kv_tile"),
    )(q, k, v, d_out, lse, di)


def _bwd_fused_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_acc_ref, dk_ref, dv_ref,
                      *, bq, bk, stages, G, n_q_blocks, scale):
    """dK, dV and dQ in one pass (5 matmuls per tile instead of the two kernels' 7).

    As `_dkv_kernel`, plus per query tile: each warpgroup stores its dS^T tile (bf16) to
    shared memory and announces it (`ds_ready`). For head_dim 128, warpgroup w forms columns
    [64w, 64w + 64) of dQ = dS K from both groups' dS^T and K tiles (for 64, its own keys'
    share of all columns), then adds them into the fp32 dQ buffer in global memory with a
    TMA reduce-add. The dQ matmul is issued together with the dK/dV ones, so the tensor
    cores drain one queue per tile, and the dS^T tiles are double-buffered (`ds_free`), so
    the groups need not run in lockstep."""
    plgpu = _plgpu()
    H = q_ref.shape[-1]
    split = H >= 128
    hh = H // 2 if split else H
    dtype = q_ref.dtype
    swz = _swizzle()
    swz32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    b, kvh = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_k0 = lax.axis_index("kv_tile") * (2 * bk)  # early keys see the most queries: first
    first = lax.div(cta_k0, jnp.int32(bq))
    n_steps = n_q_blocks - first
    overlap = TUNING["fused_dq_overlap"]

    def body(k_smem2, v_smem2, q_smem, do_smem, lse_smem, di_smem, ds_smem, dq_smem,
             kv_bar, q_bar, do_bar, row_bar, q_free, do_free, ds_ready, ds_free):
        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(240, action="increase")
            k_smem, v_smem, k0, rows = _own_kv(k_ref, v_ref, k_smem2, v_smem2, kv_bar, wg,
                                               cta_k0, bk, b, kvh)
            if split:  # the other group's K too: dQ's columns need all of the CTA's keys
                plgpu.barrier_wait(kv_bar.at[1 - wg])
            cols = pl.ds(wg * hh, hh) if split else pl.ds(0, H)
            zeros = plgpu.layout_cast(jnp.full((bk, H), 0, jnp.float32), plgpu.Layout.WGMMA)
            zeros_t = plgpu.layout_cast(jnp.full((bk, bq), 0, jnp.float32), plgpu.Layout.WGMMA)
            zeros_q = plgpu.layout_cast(jnp.full((bq, hh), 0, jnp.float32), plgpu.Layout.WGMMA)
            unmasked = lax.div(k0 + bk - 1 + bq - 1, jnp.int32(bq))

            def add_dq(dq, t):
                """dQ of step t (query tile, head) += dq, by TMA from shared memory."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last copy has read
                dq_smem.at[wg][...] = dq
                plgpu.commit_smem()
                i = first + lax.rem(t, n_steps)
                h = kvh * G + lax.div(t, n_steps)
                plgpu.copy_smem_to_gmem(dq_smem.at[wg],
                                        dq_acc_ref.at[b, pl.ds(i * bq, bq), h, cols],
                                        reduction_op="add")

            def step(i, carry, g, masked):
                dk, dv = carry
                t = g * n_steps + i - first
                slot = lax.rem(t, jnp.int32(stages))
                buf = lax.rem(t, jnp.int32(2))
                q_s, do_s = q_smem.at[slot], do_smem.at[slot]
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(do_bar.at[slot])

                def s_dp(refs):
                    s_ref, dp_ref = refs
                    plgpu.wgmma(s_ref, k_smem, _t(q_s))
                    plgpu.wgmma(dp_ref, v_smem, _t(do_s))
                s_t, dp_t = pl.run_state(s_dp)((plgpu.ACC.init(zeros_t),
                                                 plgpu.ACC.init(zeros_t)))
                plgpu.barrier_wait(row_bar.at[slot])
                p_t, ds_t = _p_ds(s_t, dp_t, lse_smem.at[slot], di_smem.at[slot], i * bq, k0,
                                  scale, masked, dtype)
                if split:  # both groups' dQ of step t - 2 has read this buffer
                    pl.when(t >= 2)(lambda: plgpu.barrier_wait(ds_free.at[buf]))
                ds_smem.at[buf, wg][...] = ds_t
                plgpu.commit_smem()
                if split:
                    plgpu.barrier_arrive(ds_ready.at[buf])

                def grads(refs):
                    # overlap: dV, then dQ (once the other group's dS^T is stored), then dK,
                    # and dQ's fp32 tile goes out while dK's matmul still runs (FA3's order);
                    # else all three finish before the store
                    dv_ref, dk_ref, dq_ref = refs
                    plgpu.wgmma(dv_ref, p_t, do_s)
                    if not overlap:
                        plgpu.wgmma(dk_ref, ds_t, q_s)
                    if split:
                        plgpu.barrier_wait(ds_ready.at[buf])  # the other group's tile too
                        for u in range(2):
                            plgpu.wgmma(dq_ref, _t(ds_smem.at[buf, u]), k_smem2.at[u, :, cols])
                    else:
                        plgpu.wgmma(dq_ref, _t(ds_smem.at[buf, wg]), k_smem)
                    if overlap:
                        plgpu.wgmma(dk_ref, ds_t, q_s)
                        dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=1)
                        if split:
                            plgpu.barrier_arrive(ds_free.at[buf])
                        add_dq(dq, t)
                dv, dk, dq = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk),
                                                  plgpu.ACC.init(zeros_q)))
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                if not overlap:
                    if split:
                        plgpu.barrier_arrive(ds_free.at[buf])
                    add_dq(dq, t)
                return dk, dv

            carry = (zeros, zeros)
            for g in range(G):
                carry = lax.fori_loop(first, unmasked,
                                      functools.partial(step, g=g, masked=True), carry)
                carry = lax.fori_loop(unmasked, n_q_blocks,
                                      functools.partial(step, g=g, masked=False), carry)
            dk, dv = carry
            if split:  # the other group's last dQ has read this group's K: reuse its buffer
                plgpu.barrier_wait(ds_free.at[lax.rem(G * n_steps - 1, 2)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            _write_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, rows, scale)

        pl.when(wg == 2)(lambda: _q_do_producer(
            (q_ref, do_ref, lse_ref, di_ref), (q_smem, do_smem, lse_smem, di_smem),
            (q_bar, do_bar, row_bar), (q_free, do_free), b, kvh, G, first, n_steps, bq,
            stages, registers=24))

    pl.run_scoped(
        body,
        plgpu.SMEM((2, bk, H), dtype, transforms=swz),
        plgpu.SMEM((2, bk, H), dtype, transforms=swz),
        plgpu.SMEM((stages, bq, H), dtype, transforms=swz),
        plgpu.SMEM((stages, bq, H), dtype, transforms=swz),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((2, 2, bk, bq), dtype, transforms=swz),  # dS^T: [step parity, group]
        plgpu.SMEM((2, bq, hh), jnp.float32, transforms=swz32),  # dQ tile per group
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # k and v copies per group
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # lse and delta copies
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # ds_ready: both dS^T tiles stored
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # ds_free: both groups' dQ read them
        collective_axes="wg",
    )


def _bwd_fused(q, k, v, d_out, out, lse):
    """(dq, dk, dv) from one kernel; dQ accumulates in fp32 and is cast once at the end."""
    plgpu = _plgpu()
    B, T, N, H = q.shape
    K = k.shape[2]
    bk, bq, stages = TUNING["dkv"]
    stages = max(1, min(stages, T // bq))
    di = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    mesh = plgpu.Mesh(grid=(K, B, T // (2 * bk)), grid_names=("heads", "batch", "kv_tile"),
                      num_threads=3, thread_name="wg")
    dk, dv = pl.kernel(
        functools.partial(_bwd_fused_kernel, bq=bq, bk=bk, stages=stages, G=N // K,
                          n_q_blocks=T // bq, scale=H**-0.5),
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, d_out, lse, di, dq_acc)
    dq = (dq_acc[...] * H**-0.5).astype(q.dtype)
    return dq, dk, dv
