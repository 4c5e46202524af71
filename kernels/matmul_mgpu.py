"""bf16 GEMMs with fp32 accumulation on Hopper (Mosaic GPU), in the three layouts a dense
layer's training step needs, and `dense` / `dense_multi`: x @ w with a backward made of the
same kernel.

    y  = matmul(x, w)                         # forward        (M, K) @ (K, N)
    dx = matmul(dy, w, transpose_b=True)      # input grad     (M, N) @ (K, N)^T
    dw = matmul(x, dy, transpose_a=True)      # weight grad    (M, K)^T @ (M, N)
    dx = matmul(dy2, w2, dx, transpose_b=True)  # + c: a second projection's input grad added

Why: GEMMs are ~70% of the OLMo-2-1B step, and a GEMM of our own is the base on which
elementwise work can be fused into epilogues. It is not faster than cuBLAS: alone at the 1B
shapes the H200 runs it at 716-781 TFLOP/s against XLA's 736-795 (ahead only at the MLP
down-projection), and the step with `model.matmul="mgpu"` is 3-5% slower (docs/performance.md,
eighth session; `python bench/gemm.py`).
Transposes are read by the TMA and the MMA (K-major/MN-major shared-memory operands), never
written to memory.

Layout (after jax's Pallas example `hopper_matmul_mgpu`): a persistent kernel, one CTA per
SM walking output tiles in a planar snake (`width` tiles wide) for L2 reuse; per CTA a
producer warpgroup streams A/B K-blocks through a `stages`-deep TMA ring and two consumer
warpgroups each own a (tile_m, tile_n) fp32 accumulator, split along M or N (`wg`); the
epilogue writes bf16 in 64 x 64 pieces through two shared-memory slots per warpgroup, so a
piece's TMA store overlaps the next piece's conversion.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

# tile: (tile_m, tile_n per consumer warpgroup, tile_k, ring stages); wg: the dimension the
# two consumer warpgroups split ("M" or "N"); width: the planar snake's width in tiles,
# walked along N; cluster: None, or "M"/"N": two CTAs side by side along that dimension
# share the other operand's blocks (one TMA load multicast to both). Measured on the H200
# by bench/gemm.py (docs/performance.md).
TUNING = {"tile": (128, 128, 64, 4), "wg": "M", "width": 8, "cluster": None}
# The faster `wg` per layout and weight shape, keyed (layout, the two dims that are not the
# token count); measured on the H200 at 32768 tokens (bench/gemm.py, 2026-11-29).
TUNED_WG = {("nn", 2048, 2048): "N", ("nt", 2048, 2048): "M", ("tn", 2048, 2048): "N",
            ("nn", 2048, 8192): "M", ("nt", 2048, 8192): "N", ("tn", 2048, 8192): "N",
            ("nn", 8192, 2048): "M", ("nt", 8192, 2048): "M", ("tn", 8192, 2048): "N"}
EPI = 64  # epilogue piece (EPI x EPI)
OUTPUT_NAME = "matmul_mgpu_out"
H100_SMS = 132  # H100/H200: the grid when lowering on a host without a GPU


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def _num_sms() -> int:
    try:
        return jax.local_devices(backend="gpu")[0].core_count
    except (RuntimeError, ValueError, AttributeError):  # lowering on a CPU host
        return H100_SMS


def _dims(a_shape, b_shape, transpose_a, transpose_b):
    m, k = a_shape[::-1] if transpose_a else a_shape
    k2, n = b_shape[::-1] if transpose_b else b_shape
    return m, k, k2, n


def supported(a_shape, b_shape, transpose_a=False, transpose_b=False, tuning=None) -> bool:
    """Whether the kernel takes these operand shapes (2-D, tile multiples)."""
    if len(a_shape) != 2 or len(b_shape) != 2:
        return False
    tuning = tuning or TUNING
    _, _, cl_m, cl_n = _output_tiles(tuning)
    m, k, k2, n = _dims(a_shape, b_shape, transpose_a, transpose_b)
    return k == k2 and m % cl_m == 0 and n % cl_n == 0 and k % tuning["tile"][2] == 0


def _output_tiles(tuning):
    """(rows, columns) of the output one CTA covers per tile, then one cluster."""
    tm, tn, _, _ = tuning["tile"]
    wg_m, cluster = tuning["wg"] == "M", tuning.get("cluster")
    cta_m, cta_n = tm * (1 + wg_m), tn * (2 - wg_m)
    return cta_m, cta_n, cta_m * (1 + (cluster == "M")), cta_n * (1 + (cluster == "N"))


def _kernel(a_gmem, b_gmem, *refs, transpose_a, transpose_b, tuning):
    plgpu = _plgpu()
    c_gmem, out_gmem = refs if len(refs) == 2 else (None, refs[0])
    tm, tn, tk, stages = tuning["tile"]
    wg_m, cluster = tuning["wg"] == "M", tuning.get("cluster")
    m, k, _, n = _dims(a_gmem.shape, b_gmem.shape, transpose_a, transpose_b)
    cta_m, cta_n, cl_m, cl_n = _output_tiles(tuning)
    m_iters, n_iters, k_iters = m // cl_m, n // cl_n, k // tk
    # a cluster along N shares A's blocks (same rows), along M shares B's
    a_shared = dict(collective_axes=("cluster",)) if cluster == "N" else {}
    b_shared = dict(collective_axes=("cluster",)) if cluster == "M" else {}

    def transforms(minor):  # 128-byte swizzle over the block's minor dimension
        swz = plgpu.find_swizzle(minor * 16)
        return plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz)

    a_spec = (plgpu.BlockSpec((tk, cta_m), lambda i: (i, 0), transforms=transforms(cta_m),
                              memory_space=plgpu.SMEM, **a_shared) if transpose_a else
              plgpu.BlockSpec((cta_m, tk), lambda i: (0, i), transforms=transforms(tk),
                              memory_space=plgpu.SMEM, **a_shared))
    b_spec = (plgpu.BlockSpec((cta_n, tk), lambda i: (0, i), transforms=transforms(tk),
                              memory_space=plgpu.SMEM, **b_shared) if transpose_b else
              plgpu.BlockSpec((tk, cta_n), lambda i: (i, 0), transforms=transforms(cta_n),
                              memory_space=plgpu.SMEM, **b_shared))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=context, in_specs=[a_spec, b_spec])

    ignore = lambda *_, **__: None  # noqa: E731 -- allocations do not depend on the body
    epi_t = transforms(EPI)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((2, 2, EPI, EPI), out_gmem.dtype, transforms=epi_t),
        c_bar=None if c_gmem is None else plgpu.Barrier(num_arrivals=1, num_barriers=4),
        collective_axes="wg")
    def _scope(allocs, out_smem, c_bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, tuning["width"])
            if cluster is not None:  # this CTA's tile within the cluster's
                cta = lax.axis_index("cluster")
                mi, ni = (mi * 2 + cta, ni) if cluster == "M" else (mi, ni * 2 + cta)
            row0 = mi * cta_m + (wg * tm if wg_m else 0)
            col0 = ni * cta_n + (0 if wg_m else wg * tn)

            n_pieces = (tm // EPI) * (tn // EPI)

            def piece(p):  # (rows, cols) of epilogue piece p in the output
                a, b = divmod(p, tn // EPI)
                return pl.ds(row0 + a * EPI, EPI), pl.ds(col0 + b * EPI, EPI)

            def load_c(p):  # c's piece p into slot p % 2, where its sum is then written
                plgpu.copy_gmem_to_smem(c_gmem.at[piece(p)], out_smem.at[wg, p % 2],
                                        c_bar.at[wg * 2 + p % 2])

            def context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _acc(acc_ref):
                    if c_gmem is not None:  # c's first two pieces arrive during the MMAs
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores
                        load_c(0)
                        load_c(1)
                    eval_pipeline(acc_ref)
                    if c_gmem is None:
                        acc = acc_ref[...].astype(out_gmem.dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores
                    else:
                        acc = acc_ref[...]
                    for p in range(n_pieces):
                        a, b = divmod(p, tn // EPI)
                        part = acc[a * EPI:(a + 1) * EPI, b * EPI:(b + 1) * EPI]
                        if c_gmem is None:
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # slot is free
                            out_smem[wg, p % 2] = part
                        else:
                            plgpu.barrier_wait(c_bar.at[wg * 2 + p % 2])
                            out_smem[wg, p % 2] = (
                                part + out_smem[wg, p % 2].astype(jnp.float32)).astype(
                                out_gmem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, p % 2], out_gmem.at[piece(p)])
                        if c_gmem is not None and p + 2 < n_pieces:  # refill while p + 1 runs
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            load_c(p + 2)

            def mma(_, a_smem, b_smem, acc_ref):
                if transpose_a:
                    a_op = plgpu.transpose_ref(
                        a_smem.at[:, pl.ds(wg * tm, tm)] if wg_m else a_smem, (1, 0))
                else:
                    a_op = a_smem.at[pl.ds(wg * tm, tm)] if wg_m else a_smem
                if transpose_b:
                    b_op = plgpu.transpose_ref(
                        b_smem if wg_m else b_smem.at[pl.ds(wg * tn, tn)], (1, 0))
                else:
                    b_op = b_smem if wg_m else b_smem.at[:, pl.ds(wg * tn, tn)]
                plgpu.wgmma(acc_ref, a_op, b_op)
                plgpu.wgmma_wait(0)
                return acc_ref

            rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
            pipeline(mma, context)(a_gmem.at[:, rows] if transpose_a else a_gmem.at[rows, :],
                                   b_gmem.at[cols, :] if transpose_b else b_gmem.at[:, cols],
                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def matmul_reference(a, b, transpose_a=False, transpose_b=False, c=None):
    """What `matmul` computes, in XLA."""
    out = jnp.dot(a.T if transpose_a else a, b.T if transpose_b else b,
                  preferred_element_type=jnp.float32)
    return (out if c is None else out + c.astype(jnp.float32)).astype(a.dtype)


def tuning_for(a_shape, b_shape, transpose_a=False, transpose_b=False) -> dict:
    """TUNING with the measured `wg` for this layout and weight shape (TUNED_WG), if any."""
    layout = "tn" if transpose_a else ("nt" if transpose_b else "nn")
    m, k, _, n = _dims(a_shape, b_shape, transpose_a, transpose_b)
    key = (layout, m, n) if transpose_a else (layout, k, n)  # the token count left out
    return {**TUNING, "wg": TUNED_WG.get(key, TUNING["wg"])}


def matmul(a, b, c=None, *, transpose_a=False, transpose_b=False, tuning=None):
    """op(a) @ op(b) (+ c) in a's dtype (bf16 or fp16) with fp32 accumulation; op transposes
    where asked; c, if given, is added in the epilogue (no pass of its own). Shapes must be
    tile multiples (`supported`); `tuning` defaults to `tuning_for`."""
    tuning = tuning or tuning_for(a.shape, b.shape, transpose_a, transpose_b)
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"matmul_mgpu: operands must both be bf16 or fp16, got {a.dtype} and "
                         f"{b.dtype}")
    if not supported(a.shape, b.shape, transpose_a, transpose_b, tuning):
        raise ValueError(f"matmul_mgpu: shapes {a.shape}, {b.shape} (transpose_a={transpose_a},"
                         f" transpose_b={transpose_b}) do not match, or are not multiples of "
                         f"the tiles {tuning['tile']} (wg={tuning['wg']}); check supported()")
    m, _, _, n = _dims(a.shape, b.shape, transpose_a, transpose_b)
    if c is not None and (c.shape != (m, n) or c.dtype != a.dtype):
        raise ValueError(f"matmul_mgpu: c is {c.shape} {c.dtype}, the product {(m, n)} "
                         f"{a.dtype}")
    return _matmul(a, b, c, transpose_a, transpose_b, tuple(sorted(tuning.items())))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _matmul(a, b, c, transpose_a, transpose_b, tuning_items):
    # Under jit, every call with the same shapes and layout shares one traced kernel, so its
    # Mosaic module (locations included) is identical and compiled once per step, not once
    # per layer: the unrolled 16-layer 1B step's 336 GEMM calls share 11 kernels
    # (bench/lower_cuda.py).
    plgpu = _plgpu()
    tuning = dict(tuning_items)
    m, _, _, n = _dims(a.shape, b.shape, transpose_a, transpose_b)
    clusters = dict(cluster=(2,), cluster_names=("cluster",)) if tuning.get("cluster") else {}
    body = functools.partial(_kernel, transpose_a=transpose_a, transpose_b=transpose_b,
                             tuning=tuning)
    # the kernel's name in profiles (Pallas names it after its body): a partial would be
    # "anonymous", which bench/kernel_profile cannot class as a matmul
    body.__name__ = "matmul_" + ("tn" if transpose_a else "nt" if transpose_b else "nn")
    f = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), a.dtype),
        grid=(_num_sms() // (2 if clusters else 1),), grid_names=("sm",), **clusters,
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(a, b) if c is None else f(a, b, c)


def dense(x, w):
    """x (..., K) @ w (K, N) with forward and both backward GEMMs on this kernel: `dense_multi`
    with one weight."""
    return dense_multi(x, w)[0]


def dense_multi(x, *ws):
    """(x @ w for w in ws): projections of one input (q/k/v, gate/up) whose input gradients
    are summed in the GEMMs' epilogues (each adds the previous one's), not in passes of
    their own. The outputs are named `OUTPUT_NAME` so a remat policy can keep them like an
    XLA dot's (a custom call is no `dot_general`: unnamed, "dots" would re-run the forward
    GEMMs in the backward pass)."""
    return tuple(checkpoint_name(y, OUTPUT_NAME) for y in _dense_multi(x, *ws))


@jax.custom_vjp
def _dense_multi(x, *ws):
    return _dense_multi_fwd(x, *ws)[0]


def _dense_multi_fwd(x, *ws):
    x2 = x.reshape(-1, x.shape[-1])
    return tuple(matmul(x2, w).reshape(*x.shape[:-1], w.shape[1]) for w in ws), (x, ws)


def _dense_multi_bwd(res, dys):
    x, ws = res
    x2, dx = x.reshape(-1, x.shape[-1]), None
    dys = [dy.reshape(-1, dy.shape[-1]).astype(x.dtype) for dy in dys]
    for w, dy in zip(ws, dys):
        dx = matmul(dy, w, dx, transpose_b=True)
    return (dx.reshape(x.shape), *(matmul(x2, dy, transpose_a=True) for dy in dys))


_dense_multi.defvjp(_dense_multi_fwd, _dense_multi_bwd)


def dense_supported(x_shape, w_shape) -> bool:
    """Whether `dense` runs its three GEMMs on this kernel for these shapes."""
    m, (k, n) = math.prod(x_shape[:-1]), w_shape
    layouts = (((m, k), (k, n), False, False), ((m, n), (k, n), False, True),
               ((m, k), (m, n), True, False))
    return all(supported(a, b, ta, tb, tuning_for(a, b, ta, tb)) for a, b, ta, tb in layouts)
