"""SwiGLU's gate, h = silu(gate) * up, with its backward in one pass (Pallas, Triton lowering).

Why: XLA runs this backward as two passes over the (tokens, mlp_hidden) activations, one
for dup = dh * silu(gate) and one for dgate, each re-reading dh and gate (33.5 + 26.5 ms
per 32 sequences of the 1B step on an H200, docs/performance.md). The kernel reads dh, gate and up once and writes dgate and dup,
computing in fp32 (XLA's bf16 autodiff rounds between its steps). The forward stays XLA's
one fusion, which already runs at the memory bandwidth and may fuse with its neighbours.
The residuals are gate and up, the GEMM outputs that remat "dots" keeps anyway. Elementwise,
so under a mesh the backward runs per shard (`spec`, shard_map) without any collective.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# a program's tile of the (tokens, mlp_hidden) activations (at most; a power of two), warps
# (H100, bench/swiglu.py --sweep, 2026-12-06: 1.84 ms at 65,536 x 8,192, at 2.9 TB/s)
TUNING = {"rows": 4, "cols": 2048, "num_warps": 8}
MIN_COLS = 128


def reference(gate, up):
    """The forward, in XLA: the kernel's custom VJP runs this same forward."""
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
    return _per_shard(spec, interpret, gate, up, dh.astype(gate.dtype))


_swiglu.defvjp(_fwd, _bwd)


def _per_shard(spec, interpret, gate, up, dh):
    """The backward kernel on each shard of `spec` (a pallas_call is opaque to the SPMD
    partitioner), or on the whole arrays without a mesh (spec None)."""
    fn = functools.partial(_local_backward, interpret=interpret)
    if spec is None:
        return fn(gate, up, dh)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,) * 3,
                         out_specs=(spec, spec), check_vma=False)(gate, up, dh)


def _local_backward(gate, up, dh, interpret):
    shape, F = gate.shape, gate.shape[-1]
    if not supported(shape):
        raise ValueError(f"swiglu: activations {shape} (per shard) must split into tiles of "
                         f"{TUNING['rows']} rows x a power of two >= {MIN_COLS} columns; use "
                         "model.kernels='xla'")
    dg, du = backward(gate.reshape(-1, F), up.reshape(-1, F), dh.reshape(-1, F),
                      interpret=interpret)
    return dg.reshape(shape), du.reshape(shape)


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


def backward(gate, up, dh, *, interpret: bool = False):
    """(dgate, dup) of silu(gate) * up for (M, F) arrays, in gate's dtype."""
    (M, F), rows = gate.shape, TUNING["rows"]
    block = pl.BlockSpec((rows, _cols(F)), lambda i, j: (i, j))
    return pl.pallas_call(
        _bwd_kernel,
        grid=(M // rows, F // _cols(F)),
        in_specs=[block, block, block],
        out_specs=[block, block],
        out_shape=[jax.ShapeDtypeStruct((M, F), gate.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=TUNING["num_warps"], num_stages=1),
        interpret=interpret,
        name="swiglu_bwd",
    )(gate, up, dh)
