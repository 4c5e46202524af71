"""SwiGLU's gate, h = silu(gate) * up, with its backward in one pass (Pallas, Triton lowering).

Why: XLA runs this backward as two passes over the (tokens, mlp_hidden) activations, one
for dup = dh * silu(gate) and one for dgate, each re-reading dh and gate (33.5 + 26.5 ms
per 32 sequences of the 1B step on the H200, the tenth session's profile in
docs/performance.md). The kernel reads dh, gate and up once and writes dgate and dup,
computing in fp32 (XLA's bf16 autodiff rounds between its steps). The forward stays XLA's
one fusion, which already runs at the memory bandwidth and may fuse with its neighbours.
The residuals are gate and up, the GEMM outputs that remat "dots" keeps anyway. Elementwise,
so under a mesh the backward runs per shard (`spec`, shard_map) without any collective.

`gated(x, w_gate, w_up)` is the MLP's first half (both GEMMs and the gate) with a grouped
backward: the kernel writes dgate and dup side by side as one (tokens, 2, F) cotangent, so
the input gradient is one GEMM over K = 2F (no separate sum of two GEMM outputs) and the
weight gradient one GEMM of N = 2F. An earlier build of that GEMM grouping lost because XLA
wrote the concatenation in a pass of its own (ninth session, docs/performance.md); here no
concatenation exists.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# a program's tile of the (tokens, mlp_hidden) activations (at most; a power of two), warps
# (H100, bench/swiglu.py --sweep, 2026-12-06: 1.84 ms at 65,536 x 8,192, at 2.9 TB/s)
TUNING = {"rows": 4, "cols": 2048, "num_warps": 8}
MIN_COLS = 128


def reference(gate, up):
    """The forward, in XLA, exactly as model.MLP computed it before this kernel."""
    return jax.nn.silu(gate) * up


def _cols(F: int) -> int:
    """The tile's width: TUNING's, or the largest power of two below it that divides F."""
    return math.gcd(F, TUNING["cols"])


def supported(shape) -> bool:
    """Whole tiles only: the flattened rows split into TUNING's rows, the last dim into
    columns of a power of two >= MIN_COLS."""
    return (len(shape) >= 2 and math.prod(shape[:-1]) % TUNING["rows"] == 0
            and _cols(shape[-1]) >= MIN_COLS)


def swiglu(gate, up, *, spec=None, interpret: bool = False):
    """silu(gate) * up; XLA forward, one-pass Pallas backward.

    spec: the PartitionSpec of gate/up/h over the ambient mesh; the backward then runs per
    shard under shard_map (None: one device, no mesh). interpret: Pallas' interpreter (CPU)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {gate.shape} {gate.dtype} and up {up.shape} {up.dtype} "
                         "must match")
    return _swiglu(gate, up, spec, bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _swiglu(gate, up, spec, interpret):
    return reference(gate, up)


def _fwd(gate, up, spec, interpret):
    return reference(gate, up), (gate, up)


def _bwd(spec, interpret, res, dh):
    gate, up = res
    return _per_shard(spec, False, interpret, gate, up, dh.astype(gate.dtype))


_swiglu.defvjp(_fwd, _bwd)


def _per_shard(spec, stacked, interpret, gate, up, dh):
    """The backward kernel on each shard of `spec` (a pallas_call is opaque to the SPMD
    partitioner), or on the whole arrays without a mesh (spec None)."""
    fn = functools.partial(_local_backward, stacked=stacked, interpret=interpret)
    if spec is None:
        return fn(gate, up, dh)
    out = P(*spec[:-1], None, spec[-1]) if stacked else (spec, spec)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,) * 3,
                         out_specs=out, check_vma=False)(gate, up, dh)


def _local_backward(gate, up, dh, stacked, interpret):
    shape, F = gate.shape, gate.shape[-1]
    if not supported(shape):
        raise ValueError(f"swiglu: activations {shape} (per shard) must split into tiles of "
                         f"{TUNING['rows']} rows x a power of two >= {MIN_COLS} columns; use "
                         "model.mlp_impl='xla'")
    out = backward(gate.reshape(-1, F), up.reshape(-1, F), dh.reshape(-1, F), stacked=stacked,
                   interpret=interpret)
    if stacked:
        return out.reshape(*shape[:-1], 2, F)
    return out[0].reshape(shape), out[1].reshape(shape)


def gated(x, w_gate, w_up, *, f32_dw: bool = True, spec=None, interpret: bool = False):
    """silu(x @ w_gate) * (x @ w_up) in x's dtype (the weights are cast to it), the MLP's
    first half, with the grouped backward of the module docstring: the kernel's stacked
    (..., 2, F) cotangent feeds one input-gradient GEMM and one weight-gradient GEMM.

    f32_dw: the weight gradient's GEMM writes fp32 (model.weight_grad_dtype), else x's dtype;
    either way it is returned in the weights' dtype. spec: as for `swiglu`, the
    PartitionSpec of the (..., F) activations; the GEMMs stay with the SPMD partitioner."""
    if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype or x.shape[-1] != w_gate.shape[0]:
        raise ValueError(f"swiglu.gated: x {x.shape}, w_gate {w_gate.shape} {w_gate.dtype} and "
                         f"w_up {w_up.shape} {w_up.dtype} must be (..., D), (D, F), (D, F)")
    return _gated(x, w_gate, w_up, bool(f32_dw), spec, bool(interpret))


def _gated_gemms(x, w_gate, w_up):
    dt = x.dtype
    return (jnp.einsum("...d,df->...f", x, w_gate.astype(dt)),
            jnp.einsum("...d,df->...f", x, w_up.astype(dt)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gated(x, w_gate, w_up, f32_dw, spec, interpret):
    return reference(*_gated_gemms(x, w_gate, w_up))


def _gated_fwd(x, w_gate, w_up, f32_dw, spec, interpret):
    gate, up = _gated_gemms(x, w_gate, w_up)  # remat "dots" saves these two dots
    return reference(gate, up), (x, w_gate, w_up, gate, up)


def _gated_bwd(f32_dw, spec, interpret, res, dh):
    x, w_gate, w_up, gate, up = res
    d_gu = _per_shard(spec, True, interpret, gate, up, dh.astype(gate.dtype))
    w_gu = jnp.stack([w_gate.astype(x.dtype), w_up.astype(x.dtype)], axis=1)  # (D, 2, F)
    dx = jnp.einsum("...cf,dcf->...d", d_gu, w_gu)
    dw = jnp.einsum("...d,...cf->dcf", x, d_gu,
                    preferred_element_type=jnp.float32 if f32_dw else x.dtype)
    return dx, dw[:, 0].astype(w_gate.dtype), dw[:, 1].astype(w_up.dtype)


_gated.defvjp(_gated_fwd, _gated_bwd)


def _grads(g_ref, u_ref, dh_ref):
    g = g_ref[...].astype(jnp.float32)
    u = u_ref[...].astype(jnp.float32)
    dh = dh_ref[...].astype(jnp.float32)
    sig = 1.0 / (1.0 + jnp.exp(-g))
    silu = g * sig
    # d silu / dg = sig + g sig (1 - sig)
    return dh * u * (sig + silu * (1.0 - sig)), dh * silu


def _bwd_kernel(g_ref, u_ref, dh_ref, dg_ref, du_ref):
    dg, du = _grads(g_ref, u_ref, dh_ref)
    dg_ref[...], du_ref[...] = dg.astype(dg_ref.dtype), du.astype(du_ref.dtype)


def _bwd_stacked_kernel(g_ref, u_ref, dh_ref, o_ref):
    dg, du = _grads(g_ref, u_ref, dh_ref)
    o_ref[:, 0, :], o_ref[:, 1, :] = dg.astype(o_ref.dtype), du.astype(o_ref.dtype)


def backward(gate, up, dh, *, stacked: bool = False, interpret: bool = False):
    """(dgate, dup) of silu(gate) * up for (M, F) arrays, in gate's dtype; stacked: one
    (M, 2, F) array holding both, [:, 0] = dgate."""
    (M, F), rows = gate.shape, TUNING["rows"]
    cols = _cols(F)
    block = pl.BlockSpec((rows, cols), lambda i, j: (i, j))
    if stacked:
        kernel, out = _bwd_stacked_kernel, jax.ShapeDtypeStruct((M, 2, F), gate.dtype)
        out_specs = pl.BlockSpec((rows, 2, cols), lambda i, j: (i, 0, j))
    else:
        kernel, out = _bwd_kernel, [jax.ShapeDtypeStruct((M, F), gate.dtype)] * 2
        out_specs = [block, block]
    return pl.pallas_call(
        kernel,
        grid=(M // rows, F // cols),
        in_specs=[block, block, block],
        out_specs=out_specs,
        out_shape=out,
        compiler_params=plgpu.CompilerParams(num_warps=TUNING["num_warps"], num_stages=1),
        interpret=interpret,
        name="swiglu_bwd_stacked" if stacked else "swiglu_bwd",
    )(gate, up, dh)
