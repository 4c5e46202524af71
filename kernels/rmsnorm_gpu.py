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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# rows per step, steps per program at most, warps; programs = rows of x / (rows * steps).
TUNING = {"rows": 8, "max_steps": 8, "min_programs": 264, "num_warps": 8}


def reference(x, scale, eps: float, dtype):
    """The forward, in XLA: fp32 inside, `dtype` out. model.RMSNorm runs it for every norm
    (the kernel replaces only the backward)."""
    axes = tuple(range(x.ndim - scale.ndim, x.ndim))
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(dtype)


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
                         "use model.norm_impl='xla'")
    row_axes = (row_axes,) if isinstance(row_axes, str) else tuple(row_axes or ())
    return _rms_norm(x, scale, float(eps), jnp.dtype(dtype or x.dtype).name, row_axes,
                     bool(interpret))


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


def _steps(chunks: int) -> int:
    """The most steps per program that still leaves min_programs programs (or 1)."""
    s = TUNING["max_steps"]
    while s > 1 and (chunks % s or chunks // s < TUNING["min_programs"]):
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
