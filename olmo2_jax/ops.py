"""The OLMo 2 block's ops, and the one place that decides what runs each: XLA or a kernel.

`kernels` (config.model.kernels) is "auto" or "xla". "auto" runs the one-pass Pallas
backwards of kernels/ on GPUs wherever the per-device shapes tile and the mesh leaves
whole what a kernel needs (RMSNorm, QK-norm + RoPE, SwiGLU, the loss's logsumexp and
softmax-gradient passes), and XLA everywhere else (TPUs, CPUs, the other shapes). The
forwards are XLA's either way, so both settings compute the same forward bit for bit.
Attention has its own choice, `attention_impl`: cuDNN, Pallas flash attention, or XLA.

Each function takes plain arrays and arguments; model.py calls them as the paper's ops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import rmsnorm_gpu, swiglu_gpu, xent_gpu
from kernels.attention import HEAD_DIMS as PALLAS_HEAD_DIMS, current_platform, flash_attention
from olmo2_jax import sharding
from olmo2_jax.config import ATTENTION_IMPLS, KERNELS


def kernels_on(kernels: str) -> bool:
    """Whether `kernels` asks for the GPU kernels on the platform being compiled for."""
    if kernels not in KERNELS:
        raise ValueError(f"config.model.kernels={kernels!r}: choose one of {KERNELS}")
    return kernels == "auto" and current_platform() == "gpu"


def dense(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """A layer's weight GEMM, `jnp.einsum(spec, x, w)` in `dtype`, w being the master weight
    (fp32). In a lower-precision dtype the weight gradient's GEMM writes fp32 directly
    (autodiff would write `dtype` and then cast), so gradient accumulation over micro-batches
    and the data-parallel reduction sum unrounded products: +0.56% in the 1B step on an H100
    too, as the GEMM skips a rounding pass (docs/performance.md)."""
    x = x.astype(dtype)
    if x.dtype == jnp.float32:
        return jnp.einsum(spec, x, w.astype(dtype))
    return _dense(spec, jnp.dtype(w.dtype).name, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense(spec, w_dtype, x, w):
    return jnp.einsum(spec, x, w.astype(x.dtype))


def _dense_fwd(spec, w_dtype, x, w):
    wc = w.astype(x.dtype)
    return jnp.einsum(spec, x, wc), (x, wc)  # remat "dots" keeps this dot's output


def _dense_bwd(spec, w_dtype, res, dy):
    x, wc = res
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", dy, wc)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, dy, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def rms_norm(x, scale, eps: float, dtype, *, kernels: str = "xla", axes=("embed",)):
    """RMSNorm over x's trailing dims (logical `axes`, scale's shape), fp32 inside, `dtype`
    out. Kernel: the one-pass backward (kernels/rmsnorm_gpu.py) per shard of rows, where
    the mesh leaves the features whole."""
    if kernels_on(kernels):
        row_axes, shards, why = sharding.split_rows(tuple(axes))
        if why is None and rmsnorm_gpu.supported((x.size // shards,), scale.shape):
            return rmsnorm_gpu.rms_norm(x, scale, eps, dtype, row_axes=row_axes)
    return rmsnorm_gpu.reference(x, scale, eps, dtype)


def apply_rope(x_BTNH, positions_BT, theta: float):
    """Rotary embedding, half-split ("rotate_half") layout, computed in fp32."""
    return rmsnorm_gpu.apply_rope(x_BTNH, positions_BT, theta)


def qk_norm_rope(x_BTNH, scale_NH, positions_BT, theta: float, eps: float, dtype, *,
                 kernels: str = "xla", axes=("heads", "head_dim")):
    """OLMo 2's full-width QK-norm (over heads and head_dim together) followed by RoPE.
    Kernel: both backwards in one pass (rmsnorm_gpu.rms_norm_rope), where the mesh leaves the
    heads whole and the shard tiles; else the norm alone may still take its kernel."""
    if kernels_on(kernels):
        row_axes, shards, why = sharding.split_rows(tuple(axes))
        shard = (x_BTNH.shape[0] // shards, *x_BTNH.shape[1:])
        if why is None and rmsnorm_gpu.rope_supported(shard):
            return rmsnorm_gpu.rms_norm_rope(x_BTNH, scale_NH, positions_BT, theta, eps, dtype,
                                             row_axes=row_axes)
    y = rms_norm(x_BTNH, scale_NH, eps, dtype, kernels=kernels, axes=axes)
    return apply_rope(y, positions_BT, theta)


def swiglu(gate, up, *, kernels: str = "xla", axes=("batch", "seq", "mlp")):
    """silu(gate) * up. Kernel: the one-pass backward (kernels/swiglu_gpu.py) per shard,
    where the per-device activations are whole tiles."""
    if kernels_on(kernels):
        spec, shape = sharding.local_shape(gate.shape, axes)
        if swiglu_gpu.supported(shape):
            return swiglu_gpu.swiglu(gate, up, spec=spec)
    return swiglu_gpu.reference(gate, up)


def xent_rows(kernels: str, chunk_shape) -> str | tuple[str, ...]:
    """What runs the fused loss's passes over one chunk of logits (rows, vocab): "xla", or
    the mesh axes the rows split over (() on one device) when kernels/xent_gpu.py runs them:
    on GPUs, with the vocabulary unsplit and the per-device chunk whole tiles."""
    if not kernels_on(kernels):
        return "xla"
    row_axes, shards, why = sharding.split_rows(("vocab",))
    if why is None and xent_gpu.supported((chunk_shape[0] // shards, chunk_shape[1])):
        return row_axes
    return "xla"


def attention_impl(name: str, head_dim: int = 128) -> str:
    """Resolves config.model.attention "auto": Pallas on TPU (head_dim 64/128), cuDNN on GPU,
    XLA elsewhere. "pallas" on a GPU runs the Hopper kernels on sm90 (kernels/attention.py)."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention={name!r}: choose one of {ATTENTION_IMPLS}")
    if name == "auto":
        platform = current_platform()  # the mesh's devices: right for AOT compiles too
        if platform == "tpu" and head_dim in PALLAS_HEAD_DIMS:
            return "pallas"
        return "cudnn" if platform == "gpu" else "xla"
    return name


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, impl: str = "xla"):
    """Causal GQA attention (K/V are not repeated); optional document masking."""
    impl = attention_impl(impl, q_BTNH.shape[-1])
    if impl == "pallas":
        return _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    mask = None
    if segment_ids_BT is not None:
        mask = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True,
                                        implementation=impl)


def _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """The Pallas kernel, run per shard (batch/heads) under the ambient mesh, if any.

    A pallas_call is opaque to the SPMD partitioner, so shard_map hands each device its
    local (batch, heads) slice; heads and kv_heads shard alike, so the GQA map stays local.
    """
    spec_q, _ = sharding.local_shape(q_BTNH.shape, ("batch", "seq", "heads", "head_dim"))
    if spec_q is None:
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    spec_kv, _ = sharding.local_shape(k_BSKH.shape, ("batch", "seq", "kv_heads", "head_dim"))
    if spec_q[1] is not None:
        raise ValueError("config.model.attention='pallas' needs the sequence unsharded "
                         f"(rule for 'seq' gives {spec_q[1]!r}); use attention='xla'")
    for what, dim, axes in (("batch", q_BTNH.shape[0], spec_q[0]),
                            ("n_heads", q_BTNH.shape[2], spec_q[2]),
                            ("n_kv_heads", k_BSKH.shape[2], spec_kv[2])):
        if dim % sharding.shards(axes):
            raise ValueError(f"config.model.attention='pallas': {what}={dim} does not split over "
                             f"the {sharding.shards(axes)} devices of mesh axes {axes!r}; change "
                             "config.mesh or use attention='xla'")
    args, specs = [q_BTNH, k_BSKH, v_BSKH], [spec_q, spec_kv, spec_kv]
    if segment_ids_BT is not None:
        args.append(segment_ids_BT)
        specs.append(jax.sharding.PartitionSpec(spec_q[0], None))
    fn = jax.shard_map(lambda *a: flash_attention(*a), mesh=jax.sharding.get_abstract_mesh(),
                       in_specs=tuple(specs), out_specs=spec_q, check_vma=False)
    return fn(*args)


def cached_attention(q_BTNH, k_new_BTKH, v_new_BTKH, kv_cache, index, start_B):
    """Causal GQA attention of T new tokens (cache slots index..index+T-1) over the cached
    slots [start_b, index) of each row plus the new tokens themselves.

    `kv_cache` is None (prefill: nothing cached yet) or (k_BKSH, v_BKSH). Rows are
    left-padded: slots before `start_B` hold padding and are masked out. Softmax in fp32.
    The cached part is written as multiply-and-reduce rather than a batched matmul: with a
    few query tokens it is a memory-bound mat-vec, and a reduction fusion reads the cache
    slice where it lies instead of first copying it into a GEMM operand.
    """
    B, T, N, H = q_BTNH.shape
    K = k_new_BTKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H) * jnp.asarray(H ** -0.5, q_BTNH.dtype)
    neg = jnp.finfo(jnp.float32).min  # finite, so an all-masked padding row gives no NaN
    t = jnp.arange(T)
    new_ok_BTT = (t[None, :, None] >= t[None, None, :]) & (
        index + t[None, None, :] >= start_B[:, None, None])
    s_new = jnp.einsum("BTKGH,BUKH->BKGTU", q, k_new_BTKH, preferred_element_type=jnp.float32)
    scores = [jnp.where(new_ok_BTT[:, None, None], s_new, neg)]
    if kv_cache is not None:
        k_BKSH, v_BKSH = kv_cache
        s_idx = jnp.arange(k_BKSH.shape[2])
        old_ok_BS = (s_idx[None] < index) & (s_idx[None] >= start_B[:, None])
        q_BKGTH = q.transpose(0, 2, 3, 1, 4).astype(jnp.float32)
        s_old = jnp.sum(q_BKGTH[:, :, :, :, None, :]
                        * k_BKSH[:, :, None, None].astype(jnp.float32), axis=-1)
        scores.insert(0, jnp.where(old_ok_BS[:, None, None, None], s_old, neg))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out = jnp.einsum("BKGTU,BUKH->BTKGH", probs[..., -T:].astype(v_new_BTKH.dtype), v_new_BTKH,
                     preferred_element_type=jnp.float32)
    if kv_cache is not None:
        old = jnp.sum(probs[..., :-T, None] * v_BKSH[:, :, None, None].astype(jnp.float32),
                      axis=-2)  # B,K,G,T,H
        out = out + old.transpose(0, 3, 1, 2, 4)
    return out.astype(q_BTNH.dtype).reshape(B, T, N, H)
