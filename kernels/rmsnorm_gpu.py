"""RMSNorm with its backward in one pass (Pallas, Triton lowering: any CUDA GPU).

    y = (scale * x * rsqrt(mean(x^2) + eps)).astype(dtype)      over x's last dim(s)

Why: XLA runs this backward as three passes over x and dy (the per-token sum, the
per-feature sum that is dscale, then the elementwise dx), and under remat also re-runs the
forward's reduction to rebuild its residuals; on the H200 the 1B step's four norms per layer
(QK-norm, the two post-norms) spend ~1.4 ms per layer there (docs/performance.md, eighth
session). The kernel reads each row of x and dy once: it recomputes rsqrt in registers,
writes dx, and keeps dscale's partial sums in registers over its program's rows; XLA adds
the programs' partials (P x D fp32, ~4 MB). The residuals are x and scale only, which the
"dots" remat policy already keeps (x is a GEMM's output). The forward stays XLA's, so it
keeps fusing with the residual adds and RoPE around it. Under a mesh of several devices
the backward runs per shard of rows (`row_axes`, shard_map) and psums dscale; the features
must not be split.

`rms_norm_rope` is QK-norm followed by RoPE, as the model applies them to q and k: the same
XLA forward, and one backward pass that rotates dy back per head in registers (sin and cos
from the positions) before the norm's backward. It removes XLA's RoPE-backward pass over dq
and dk (8.6 ms per 32 sequences of the 1B step on the H200, tenth session) and the bf16
round trip between the two backwards.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# rows per step, steps per program at most, warps; programs = rows of x / (rows * steps).
TUNING = {"rows": 8, "max_steps": 8, "min_programs": 264, "num_warps": 8}
# the same for rms_norm_rope's backward, which holds both halves of each head in registers
# (H100, bench/rmsnorm.py --sweep, 2026-12-06: 0.446 ms at 32,768 tokens, XLA's pair 0.571)
ROPE_TUNING = {"rows": 4, "max_steps": 8, "min_programs": 264, "num_warps": 16}


def reference(x, scale, eps: float, dtype):
    """The forward, in XLA: fp32 inside, `dtype` out. model.RMSNorm runs it for every norm
    (the kernel replaces only the backward)."""
    axes = tuple(range(x.ndim - scale.ndim, x.ndim))
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(dtype)


def apply_rope(x_BTNH, positions_BT, theta: float):
    """Rotary embedding, half-split ("rotate_half") layout, computed in fp32."""
    h = x_BTNH.shape[-1]
    angles = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(h, theta)  # B,T,H/2
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def rope_inv_freq(head_dim: int, theta: float):
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def supported(x_shape, scale_shape) -> bool:
    """Rows must split into whole steps, and Triton wants a power-of-two feature width."""
    D, M = math.prod(scale_shape), math.prod(x_shape) // max(1, math.prod(scale_shape))
    return D >= 16 and D & (D - 1) == 0 and M % TUNING["rows"] == 0


def rms_norm(x, scale, eps: float, dtype=None, *, row_axes=None, interpret: bool = False):
    """RMSNorm over x's trailing `scale.ndim` dims; XLA forward, one-pass Pallas backward.

    row_axes: the ambient mesh's axes that x's rows (its leading dims, flattened) are split
    over; the backward then runs per shard under shard_map (None: one device, no mesh).
    interpret: the kernel in Pallas' interpreter (CPU tests)."""
    if x.shape[x.ndim - scale.ndim:] != scale.shape:
        raise ValueError(f"rms_norm: scale {scale.shape} must match x's trailing dims {x.shape}")
    if not supported(x.shape, scale.shape):
        raise ValueError(f"rms_norm: x {x.shape} / scale {scale.shape}: the feature width must "
                         f"be a power of two and the rows a multiple of {TUNING['rows']}; "
                         "use model.kernels='xla'")
    return _rms_norm(x, scale, float(eps), jnp.dtype(dtype or x.dtype).name,
                     _axes(row_axes), bool(interpret))


def _axes(row_axes) -> tuple[str, ...]:
    """row_axes as a hashable tuple (a custom_vjp's nondiff argument)."""
    return (row_axes,) if isinstance(row_axes, str) else tuple(row_axes or ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rms_norm(x, scale, eps, dtype, row_axes, interpret):
    return reference(x, scale, eps, dtype)


def _fwd(x, scale, eps, dtype, row_axes, interpret):
    return reference(x, scale, eps, dtype), (x, scale)


def _bwd(eps, dtype, row_axes, interpret, res, dy):
    x, scale = res
    D = scale.size
    args = (x.reshape(-1, D), dy.reshape(-1, D), scale.reshape(D))
    if not row_axes:
        dx, dscale = backward(*args, eps, interpret=interpret)
    else:  # a pallas_call is opaque to the SPMD partitioner: one kernel per shard of rows
        def local(x, dy, scale):
            dx, dscale = backward(x, dy, scale, eps, interpret=interpret)
            return dx, jax.lax.psum(dscale, row_axes)

        rows = jax.sharding.PartitionSpec(row_axes, None)
        dx, dscale = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                                   in_specs=(rows, rows, jax.sharding.PartitionSpec()),
                                   out_specs=(rows, jax.sharding.PartitionSpec()),
                                   check_vma=False)(*args)
    return dx.reshape(x.shape), dscale.reshape(scale.shape).astype(scale.dtype)


_rms_norm.defvjp(_fwd, _bwd)


def rms_norm_rope(x_BTNH, scale_NH, positions_BT, theta: float, eps: float, dtype=None, *,
                  row_axes=None, interpret: bool = False):
    """apply_rope(RMSNorm over (heads, head_dim)): XLA forward (the model's two ops exactly),
    one-pass Pallas backward. row_axes, interpret: as in rms_norm."""
    B, T, N, H = x_BTNH.shape
    if scale_NH.shape != (N, H) or positions_BT.shape != (B, T):
        raise ValueError(f"rms_norm_rope: x {x_BTNH.shape} needs scale {(N, H)} (got "
                         f"{scale_NH.shape}) and positions {(B, T)} (got {positions_BT.shape})")
    if not rope_supported(x_BTNH.shape):
        raise ValueError(f"rms_norm_rope: x {x_BTNH.shape}: heads and head_dim / 2 must be "
                         f"powers of two and the tokens a multiple of {ROPE_TUNING['rows']}; use "
                         "model.kernels='xla'")
    return _rms_norm_rope(x_BTNH, scale_NH, positions_BT, float(theta), float(eps),
                          jnp.dtype(dtype or x_BTNH.dtype).name, _axes(row_axes),
                          bool(interpret))


def rope_supported(x_shape) -> bool:
    *rows, N, H = x_shape
    H2 = H // 2
    return (H % 2 == 0 and H2 >= 16 and H2 & (H2 - 1) == 0 and N & (N - 1) == 0
            and math.prod(rows) % ROPE_TUNING["rows"] == 0)


def _rope_reference(x, scale, positions, theta, eps, dtype):
    return apply_rope(reference(x, scale, eps, dtype), positions, theta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _rms_norm_rope(x, scale, positions, theta, eps, dtype, row_axes, interpret):
    return _rope_reference(x, scale, positions, theta, eps, dtype)


def _rope_fwd(x, scale, positions, theta, eps, dtype, row_axes, interpret):
    return _rope_reference(x, scale, positions, theta, eps, dtype), (x, scale, positions)


def _rope_bwd(theta, eps, dtype, row_axes, interpret, res, dy):
    x, scale, positions = res
    (N, H), M = x.shape[2:], x.shape[0] * x.shape[1]
    args = (x.reshape(M, N, H), dy.astype(x.dtype).reshape(M, N, H), scale,
            positions.reshape(M).astype(jnp.int32), rope_inv_freq(H, theta))
    if not row_axes:
        dx, dscale = rope_backward(*args, eps, interpret=interpret)
    else:  # one kernel per shard of rows, as in _bwd
        def local(x, dy, scale, pos, inv_freq):
            dx, dscale = rope_backward(x, dy, scale, pos, inv_freq, eps, interpret=interpret)
            return dx, jax.lax.psum(dscale, row_axes)

        P = jax.sharding.PartitionSpec
        dx, dscale = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                                   in_specs=(P(row_axes), P(row_axes), P(), P(row_axes), P()),
                                   out_specs=(P(row_axes), P()), check_vma=False)(*args)
    dpos = np.zeros(positions.shape, jax.dtypes.float0)  # integer input: no cotangent
    return dx.reshape(x.shape), dscale.astype(scale.dtype), dpos


_rms_norm_rope.defvjp(_rope_fwd, _rope_bwd)


def _rope_bwd_kernel(x_ref, dy_ref, scale_ref, pos_ref, freq_ref, dx_ref, part_ref, *, eps,
                     rows, steps):
    N, H = scale_ref.shape
    H2 = H // 2
    lo, hi = pl.ds(0, H2), pl.ds(H2, H2)
    base = pl.program_id(0) * steps * rows
    s1 = scale_ref[:, lo].astype(jnp.float32)[None]
    s2 = scale_ref[:, hi].astype(jnp.float32)[None]
    freq = freq_ref[...]

    def rsum(a):  # over (heads, head_dim / 2), one axis at a time for Triton
        return jnp.sum(jnp.sum(a, axis=2), axis=1)

    def body(i, acc):
        r = pl.ds(base + i * rows, rows)
        x1 = x_ref[r, :, lo].astype(jnp.float32)
        x2 = x_ref[r, :, hi].astype(jnp.float32)
        dy1 = dy_ref[r, :, lo].astype(jnp.float32)
        dy2 = dy_ref[r, :, hi].astype(jnp.float32)
        angles = pos_ref[r].astype(jnp.float32)[:, None] * freq[None, :]
        sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
        # RoPE's backward: rotate dy by -angle, giving dL/d(normed x)
        dz1 = dy1 * cos + dy2 * sin
        dz2 = dy2 * cos - dy1 * sin
        rstd = lax.rsqrt(rsum(x1 * x1 + x2 * x2) / (N * H) + eps)[:, None, None]
        xh1, xh2 = x1 * rstd, x2 * rstd
        g1, g2 = dz1 * s1, dz2 * s2
        c = (rsum(g1 * xh1 + g2 * xh2) / (N * H))[:, None, None]
        dx_ref[r, :, lo] = (rstd * (g1 - xh1 * c)).astype(dx_ref.dtype)
        dx_ref[r, :, hi] = (rstd * (g2 - xh2 * c)).astype(dx_ref.dtype)
        return acc[0] + jnp.sum(dz1 * xh1, axis=0), acc[1] + jnp.sum(dz2 * xh2, axis=0)

    zero = jnp.zeros((N, H2), jnp.float32)
    a1, a2 = lax.fori_loop(0, steps, body, (zero, zero))
    part_ref[:, lo] = a1
    part_ref[:, hi] = a2


def rope_backward(x, dy, scale, positions, inv_freq, eps: float, *, interpret: bool = False):
    """(dx, dscale) of rms_norm_rope for x, dy (M, N, H), scale (N, H), positions (M,) and
    RoPE's inverse frequencies (H / 2,); dx in x's dtype, dscale fp32."""
    (M, N, H), rows = x.shape, ROPE_TUNING["rows"]
    steps = _steps(M // rows, ROPE_TUNING)
    programs = M // (rows * steps)
    kernel = functools.partial(_rope_bwd_kernel, eps=eps, rows=rows, steps=steps)
    whole = pl.BlockSpec((M, N, H), lambda i: (0, 0, 0))
    dx, part = pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[whole, whole, pl.BlockSpec((N, H), lambda i: (0, 0)),
                  pl.BlockSpec((M,), lambda i: (0,)), pl.BlockSpec((H // 2,), lambda i: (0,))],
        out_specs=[whole, pl.BlockSpec((None, N, H), lambda i: (i, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, N, H), x.dtype),
                   jax.ShapeDtypeStruct((programs, N, H), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=ROPE_TUNING["num_warps"], num_stages=1),
        interpret=interpret,
        name="rmsnorm_rope_bwd",
    )(x, dy, scale, positions, inv_freq)
    return dx, jnp.sum(part, axis=0)


def _steps(chunks: int, tuning=None) -> int:
    """The most steps per program that still leaves min_programs programs (or 1)."""
    tuning = tuning or TUNING
    s = tuning["max_steps"]
    while s > 1 and (chunks % s or chunks // s < tuning["min_programs"]):
        s //= 2
    return s


def _bwd_kernel(x_ref, dy_ref, scale_ref, dx_ref, part_ref, *, eps, rows, steps):
    base = pl.program_id(0) * steps * rows
    scale = scale_ref[...].astype(jnp.float32)

    def body(i, acc):
        r = pl.ds(base + i * rows, rows)
        x = x_ref[r, :].astype(jnp.float32)
        dy = dy_ref[r, :].astype(jnp.float32)
        rstd = lax.rsqrt(jnp.mean(x * x, axis=1) + eps)
        xhat = x * rstd[:, None]
        g = dy * scale[None, :]
        c = jnp.mean(g * xhat, axis=1)
        dx_ref[r, :] = (rstd[:, None] * (g - xhat * c[:, None])).astype(dx_ref.dtype)
        return acc + jnp.sum(dy * xhat, axis=0)

    part_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(scale.shape, jnp.float32))


def backward(x, dy, scale, eps: float, *, interpret: bool = False):
    """(dx, dscale) of rms_norm for x, dy (M, D) and scale (D,); dx in x's dtype, dscale fp32."""
    (M, D), rows = x.shape, TUNING["rows"]
    steps = _steps(M // rows)
    programs = M // (rows * steps)
    kernel = functools.partial(_bwd_kernel, eps=eps, rows=rows, steps=steps)
    dx, part = pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[pl.BlockSpec((M, D), lambda i: (0, 0)), pl.BlockSpec((M, D), lambda i: (0, 0)),
                  pl.BlockSpec((D,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((M, D), lambda i: (0, 0)),
                   pl.BlockSpec((None, D), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, D), x.dtype),
                   jax.ShapeDtypeStruct((programs, D), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=TUNING["num_warps"], num_stages=1),
        interpret=interpret,
        name="rmsnorm_bwd",
    )(x, dy, scale)
    return dx, jnp.sum(part, axis=0)
