"""The OLMo 2 transformer in flax.linen (pure functional, logical axis names).

Shape key for suffixes: B batch, T query positions, S key positions, D d_model,
N query heads, K kv heads, H head_dim, F MLP hidden, V padded vocab.

Block ("reordered norm", norm on sub-layer outputs, no norm on the block input):
    h = x + RMSNorm(Attn(x));  out = h + RMSNorm(MLP(h))
QK-norm spans the full projection width (before the head split) and comes before
RoPE, exactly as the transformers `Olmo2Attention` parity reference does.
Parameters stay in `param_dtype` (fp32 master weights); matmuls run in `dtype`.

Logical axes: batch, seq, embed, vocab, heads, kv_heads, head_dim, mlp, layers.
Their mapping onto mesh axes lives only in `sharding.py`.

Decoding (`Transformer.decode`) reuses the same modules: each layer reads its slice of a
KV cache holding the earlier tokens and returns the keys/values of the new tokens; the
caller (generate.py) writes those into the cache once per step, so the layer loop never
copies the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from kernels import matmul_mgpu, rmsnorm_gpu, swiglu_gpu
from kernels.attention import HEAD_DIMS as PALLAS_HEAD_DIMS, RESIDUAL_NAMES, current_platform
from kernels.attention import flash_attention
from olmo2_jax import config as config_lib

Array = jax.Array

def _save_dots_and_attention(prim, *args, **params) -> bool:
    """Saves the weight matmuls' outputs (dots without batch dims: never the T x T scores
    of XLA attention) and a fused attention kernel's outputs (output and softmax
    statistics), so the backward pass never re-runs the attention forward."""
    return (prim.name.startswith("dot_product_attention_fwd")  # cuDNN
            or prim.name == "pallas_call"  # kernels/: the forward's output and logsumexp
            or params.get("name") in RESIDUAL_NAMES  # the same, named (Mosaic GPU kernels)
            or params.get("name") == matmul_mgpu.OUTPUT_NAME  # model.matmul="mgpu" GEMMs
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


_SAVED_NAMES = ("q_rope", "k_rope", "mlp_hidden")


def _save_dots_attention_and_named(prim, *args, **params) -> bool:
    """'dots' plus the post-RoPE q/k and the SwiGLU product (bf16), so the backward pass
    re-runs no elementwise work beyond the norms."""
    return (_save_dots_and_attention(prim, *args, **params)
            or jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES)(prim, *args, **params))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _save_dots_and_attention,
    "dots_plus": _save_dots_attention_and_named,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The static model hyperparameters (hashable, so it can sit on a linen Module)."""

    vocab_size: int = 100_278
    padded_vocab_size: int = 100_352
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 16
    head_dim: int = 128
    mlp_hidden: int = 8192
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    decode_attention: str = "reduce"  # KV-cache read: "reduce" or "einsum" (cached_attention)
    remat: str = "dots"
    attention: str = "auto"
    matmul: str = "xla"
    norm_impl: str = "auto"
    rope_impl: str = "auto"
    mlp_impl: str = "auto"
    weight_grad_dtype: str = "auto"
    input_grad_sum: str = "auto"

    @classmethod
    def from_config(cls, m) -> "ModelConfig":
        """Builds from the `config.model` ConfigDict."""
        return cls(
            vocab_size=m.vocab_size, padded_vocab_size=m.padded_vocab_size, d_model=m.d_model,
            n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
            head_dim=config_lib.head_dim(m), mlp_hidden=m.mlp_hidden, rope_theta=m.rope_theta,
            norm_eps=m.norm_eps, init_std=m.init_std, dtype=jnp.dtype(m.dtype),
            param_dtype=jnp.dtype(m.param_dtype), scan_layers=m.scan_layers, remat=m.remat,
            attention=m.attention, matmul=m.matmul, norm_impl=m.norm_impl,
            rope_impl=m.rope_impl, mlp_impl=m.mlp_impl, weight_grad_dtype=m.weight_grad_dtype,
            input_grad_sum=m.input_grad_sum)


def _init(cfg: ModelConfig):
    """Truncated normal, std `init_std`, cut at +-3 std (every matrix, embedding included)."""
    return nn.initializers.truncated_normal(cfg.init_std, lower=-3.0, upper=3.0)


def _param(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        module.cfg.param_dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the trailing `len(axes)` dims, in fp32, weight only (no bias).

    positions (QK-norm): RoPE follows the norm, with the backwards of both in one Pallas pass
    where cfg.rope_impl resolves to "pallas" (rmsnorm_gpu.rms_norm_rope)."""

    cfg: ModelConfig
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x: Array, positions: Array | None = None) -> Array:
        cfg = self.cfg
        scale = _param(self, "scale", x.shape[-len(self.axes):], self.axes,
                       nn.initializers.ones)
        # init traces tiny shapes (and needs no backward): the kernel is for apply
        if positions is not None and _rope_impl(cfg) == "pallas" and not self.is_initializing():
            row_axes, shards, why = split_rows(self.axes)
            shard_shape = (x.shape[0] // shards, *x.shape[1:])
            if why is None and rmsnorm_gpu.rope_supported(shard_shape):
                _need_gpu("rope_impl")
                return rmsnorm_gpu.rms_norm_rope(x, scale, positions, cfg.rope_theta,
                                                 cfg.norm_eps, cfg.dtype, row_axes=row_axes)
            if cfg.rope_impl == "pallas":
                raise ValueError(f"config.model.rope_impl='pallas': {self.name} cannot run per "
                                 f"shard, {why or f'its shard {shard_shape} is not whole tiles'}; "
                                 "use rope_impl='auto'")
        y = None
        if norm_impl(cfg.norm_impl) == "pallas":
            row_axes, shards, why = split_rows(self.axes)
            if why is None and rmsnorm_gpu.supported((x.size // shards,), scale.shape):
                _need_gpu("norm_impl")
                y = rmsnorm_gpu.rms_norm(x, scale, cfg.norm_eps, cfg.dtype, row_axes=row_axes)
            elif why is not None and cfg.norm_impl == "pallas":
                raise ValueError(f"config.model.norm_impl='pallas': {self.name} cannot run per "
                                 f"shard, {why}; use norm_impl='auto' (XLA for this norm)")
        if y is None:  # the same forward the kernel's custom_vjp runs, so both paths agree
            y = rmsnorm_gpu.reference(x, scale, cfg.norm_eps, cfg.dtype)
        return y if positions is None else apply_rope(y, positions, cfg.rope_theta)


def _need_gpu(key: str, value: str = "pallas"):
    if current_platform() != "gpu":
        raise ValueError(f"config.model.{key}={value!r} needs a GPU, this step is compiled for "
                         f"{current_platform()!r}; use {key}='auto'")


def apply_rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
    """Rotary embedding, half-split ("rotate_half") layout, computed in fp32."""
    return rmsnorm_gpu.apply_rope(x_BTNH, positions_BT, theta)


def attention_impl(name: str, head_dim: int = 128) -> str:
    """Resolves config.model.attention "auto": Pallas on TPU (head_dim 64/128), cuDNN on GPU
    (fastest measured on the H200, docs/kernels.md), XLA elsewhere."""
    if name == "auto":
        backend = current_platform()  # the mesh's devices: right for AOT compiles too
        if backend == "tpu" and head_dim in PALLAS_HEAD_DIMS:
            return "pallas"
        return "cudnn" if backend == "gpu" else "xla"
    return name


def norm_impl(name: str) -> str:
    """Resolves config.model.norm_impl "auto": the one-pass Pallas backward on GPUs (+1.5-2%
    in the 1B step on the H200, docs/performance.md), XLA on TPUs and CPUs. RMSNorm still
    uses XLA for a norm whose features or sequence the mesh splits (_norm_rows)."""
    return _pallas_on_gpu(name)


def _pallas_on_gpu(name: str) -> str:
    """An implementation option's "auto": the Pallas kernel on GPUs, XLA elsewhere."""
    if name == "auto":
        return "pallas" if current_platform() == "gpu" else "xla"
    return name


def _rope_impl(cfg: ModelConfig) -> str:
    """Resolves config.model.rope_impl "auto": the fused backward on GPUs (+0.4% alone, +0.5-1%
    with mlp_impl's, in the 1B step on an H100: docs/performance.md, thirteenth session), XLA
    elsewhere; RMSNorm keeps XLA where the mesh splits the heads. "pallas" replaces QK-norm's
    backward whatever norm_impl says (the kernel runs both backwards)."""
    return _pallas_on_gpu(cfg.rope_impl)


def mlp_impl(cfg: ModelConfig) -> str:
    """Resolves config.model.mlp_impl "auto": the one-pass SwiGLU backward on GPUs (+0.9% in
    the 1B step on an H100; "pallas_grouped" was not faster there), XLA elsewhere; _swiglu
    keeps XLA where the per-device activations are not whole tiles."""
    return _pallas_on_gpu(cfg.mlp_impl)


def _names(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def split_rows(axes: tuple[str, ...]):
    """How a row-wise kernel over logical `axes` of a (batch, seq, *axes) activation (a norm,
    the loss's softmax) splits over the ambient mesh: (mesh axes of the rows, their number
    of shards, None), or a reason the per-shard kernel cannot run (features or sequence
    split) in place of None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return (), 1, None
    spec = nn.logical_to_mesh_axes(("batch", "seq", *axes))

    def split(entry):  # the mesh axes of one spec entry that really split it
        return tuple(a for a in _names(entry) if mesh.shape[a] > 1)

    if split(spec[1]):
        return (), 1, f"the sequence is split over mesh axes {split(spec[1])}"
    if any(split(e) for e in spec[2:]):
        return (), 1, f"its features are split over mesh axes {sum(map(split, spec[2:]), ())}"
    rows = split(spec[0])
    return rows, math.prod(mesh.shape[a] for a in rows), None


def _check_mgpu():
    """model.matmul='mgpu' is for one Hopper GPU: say so before a long compile fails."""
    if current_platform() != "gpu":
        raise ValueError("config.model.matmul='mgpu' needs a Hopper GPU, this step is "
                         f"compiled for {current_platform()!r}; use matmul='xla'")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        raise ValueError(f"config.model.matmul='mgpu' runs on one GPU, the mesh has "
                         f"{mesh.size} devices; use matmul='xla'")


def dense(spec: str, x: Array, w: Array, cfg: ModelConfig, contract: int = 1) -> Array:
    """A layer's weight GEMM: `jnp.einsum(spec, x, w)` in `cfg.dtype`, contracting x's last
    `contract` dims with w's first ones; w is the fp32 master weight.

    cfg.weight_grad_dtype "float32": the weight gradient's GEMM writes fp32 (`_dense_f32_dw`)
    where autodiff writes the compute dtype and then casts, so a gradient-accumulation sum
    adds unrounded products. cfg.matmul "mgpu" runs the forward and both backward GEMMs on
    kernels/matmul_mgpu.py (Hopper; 3-5% slower than XLA's cuBLAS in the 1B step, a base
    for epilogue fusions: docs/performance.md) where the shapes are its tile multiples."""
    batch, out = x.shape[:-contract], w.shape[contract:]
    shape2 = (math.prod(x.shape[-contract:]), math.prod(out))
    if cfg.matmul == "mgpu" and matmul_mgpu.dense_supported((*batch, shape2[0]), shape2):
        _check_mgpu()
        y = matmul_mgpu.dense(x.reshape(*batch, shape2[0]), w.astype(cfg.dtype).reshape(shape2))
        return y.reshape(*batch, *out)
    if weight_grad_dtype(cfg) == "float32" and x.dtype != jnp.float32:
        return _dense_f32_dw(spec, x, w)  # remat "dots" still saves its forward dot
    return jnp.einsum(spec, x, w.astype(cfg.dtype))


def weight_grad_dtype(cfg: ModelConfig) -> str:
    """Resolves cfg.weight_grad_dtype "auto": see config.py."""
    return cfg.weight_grad_dtype if cfg.weight_grad_dtype != "auto" else "float32"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_f32_dw(spec, x, w):
    return _dense_f32_dw_fwd(spec, x, w)[0]


def _dense_f32_dw_fwd(spec, x, w):
    wc = w.astype(x.dtype)
    return jnp.einsum(spec, x, wc), (x, wc)


def _dense_grads(spec, x, wc, dy, f32_dw=True):
    """(dx, dw) of `jnp.einsum(spec, x, wc)`; dw written in fp32 by the GEMM if f32_dw."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", dy, wc)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, dy,
                    preferred_element_type=jnp.float32 if f32_dw else None)
    return dx, dw


def _dense_f32_dw_bwd(spec, res, dy):
    return _dense_grads(spec, *res, dy)


_dense_f32_dw.defvjp(_dense_f32_dw_fwd, _dense_f32_dw_bwd)


def dense_group(specs: tuple[str, ...], x: Array, ws: tuple[Array, ...], cfg: ModelConfig):
    """`dense` for several weights applied to one x (q/k/v, gate/up). cfg.matmul "mgpu" runs
    them as kernels/matmul_mgpu.dense_multi, which sums their input gradients inside the
    GEMMs (XLA does this for its own dots through cuBLAS's beta = 1)."""
    batch, K = x.shape[:-1], x.shape[-1]
    flat = [(K, math.prod(w.shape[1:])) for w in ws]
    if cfg.matmul == "mgpu" and all(matmul_mgpu.dense_supported(x.shape, f) for f in flat):
        _check_mgpu()
        ys = matmul_mgpu.dense_multi(x, *(w.astype(cfg.dtype).reshape(f)
                                          for w, f in zip(ws, flat)))
        return tuple(y.reshape(*batch, *w.shape[1:]) for y, w in zip(ys, ws))
    return tuple(dense(spec, x, w, cfg) for spec, w in zip(specs, ws))


def input_grad_sum(cfg: ModelConfig) -> str:
    """Resolves config.model.input_grad_sum "auto": "gemm" on GPUs (cuBLAS takes a C
    operand), "autodiff" elsewhere."""
    if cfg.input_grad_sum != "auto":
        return cfg.input_grad_sum
    return "gemm" if current_platform() == "gpu" else "autodiff"


def fork_dense_group(specs: tuple[str, ...], x: Array, ws: tuple[Array, ...], cfg: ModelConfig):
    """(x, *dense_group(specs, x, ws, cfg)): the group's GEMMs plus x itself for the
    residual's skip connection, so that x has one user and its cotangent is summed here.

    Autodiff sums a residual's cotangent as add(add(skip, dx_1), dx_2)...; XLA's GPU GEMM
    rewriter folds an add into a GEMM as its C (beta = 1) only while that GEMM has none, and
    it tries the running sum (a GEMM with C) first, so each q/k/v or gate/up group keeps one
    add pass of its own. With input_grad_sum "gemm" the backward here writes each term as
    `dy_i @ w_i^T + running sum`, starting at the skip's cotangent, and every add folds (the
    optimised HLO of the 1B step: no add left, 5 GEMMs with C per layer), once the GEMMs reach
    that rewriter as dots (train.gpu_triton_gemm=False; XLA's Triton GEMM fusions take them
    first and the adds become loop fusions). Same forward; the gradients differ only in bf16
    rounding order (on the CPU, bit for bit with fp32 weight gradients)."""
    if x.dtype != cfg.dtype:  # the skip keeps x's dtype; the GEMMs take it cast
        return (x, *dense_group(specs, x.astype(cfg.dtype), ws, cfg))
    if input_grad_sum(cfg) != "gemm" or cfg.matmul != "xla":
        return (x, *dense_group(specs, x, ws, cfg))
    return _fork_dense(specs, weight_grad_dtype(cfg) == "float32", x, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fork_dense(specs, f32_dw, x, ws):
    return _fork_dense_fwd(specs, f32_dw, x, ws)[0]


def _fork_dense_fwd(specs, f32_dw, x, ws):
    wcs = tuple(w.astype(x.dtype) for w in ws)
    ys = tuple(jnp.einsum(spec, x, wc) for spec, wc in zip(specs, wcs))
    # ws ride along only for their dtypes (they are the live fp32 masters: nothing saved)
    return (x, *ys), (x, wcs, ws)


def _fork_dense_bwd(specs, f32_dw, res, cts):
    x, wcs, ws = res
    dx, dys = cts[0].astype(x.dtype), cts[1:]
    dws = []
    # last to first, as autodiff adds them: on the CPU the same sums, bit for bit
    for spec, wc, w, dy in reversed(tuple(zip(specs, wcs, ws, dys))):
        dx_i, dw = _dense_grads(spec, x, wc, dy, f32_dw)
        dx = dx_i + dx  # the new GEMM first: see fork_dense_group
        dws.append(dw.astype(w.dtype))
    return dx, tuple(reversed(dws))


_fork_dense.defvjp(_fork_dense_fwd, _fork_dense_bwd)


def _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """The Pallas kernel, run per shard (batch/heads) under the ambient mesh, if any.

    A pallas_call is opaque to the SPMD partitioner, so shard_map hands each device its
    local (batch, heads) slice; heads and kv_heads shard alike, so the GQA map stays local.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    spec_q = nn.logical_to_mesh_axes(("batch", "seq", "heads", "head_dim"))
    spec_kv = nn.logical_to_mesh_axes(("batch", "seq", "kv_heads", "head_dim"))
    if spec_q[1] is not None:
        raise ValueError("config.model.attention='pallas' needs the sequence unsharded "
                         f"(rule for 'seq' gives {spec_q[1]!r}); use attention='xla'")
    for what, dim, axes in (("batch", q_BTNH.shape[0], spec_q[0]),
                            ("n_heads", q_BTNH.shape[2], spec_q[2]),
                            ("n_kv_heads", k_BSKH.shape[2], spec_kv[2])):
        shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if dim % shards:
            raise ValueError(f"config.model.attention='pallas': {what}={dim} does not split over "
                             f"the {shards} devices of mesh axes {axes!r}; change config.mesh "
                             "or use attention='xla'")
    args, specs = [q_BTNH, k_BSKH, v_BSKH], [spec_q, spec_kv, spec_kv]
    if segment_ids_BT is not None:
        args.append(segment_ids_BT)
        specs.append(jax.sharding.PartitionSpec(spec_q[0], None))
    fn = jax.shard_map(lambda *a: flash_attention(*a), mesh=mesh, in_specs=tuple(specs),
                       out_specs=spec_q, check_vma=False)
    return fn(*args)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, impl="xla"):
    """Causal GQA attention (K/V are not repeated); optional document masking."""
    impl = attention_impl(impl, q_BTNH.shape[-1])
    if impl == "pallas":
        return _pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    mask = None
    if segment_ids_BT is not None:
        mask = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True,
                                        implementation=impl)


def cached_attention(q_BTNH, k_new_BTKH, v_new_BTKH, kv_cache, index, start_B,
                     impl: str = "reduce"):
    """Causal GQA attention of T new tokens (cache slots index..index+T-1) over the cached
    slots [start_b, index) of each row plus the new tokens themselves.

    `kv_cache` is None (prefill: nothing cached yet) or (k_BKSH, v_BKSH). Rows are
    left-padded: slots before `start_B` hold padding and are masked out. Softmax in fp32.
    The cached part is, by default (`impl="reduce"`), written as multiply-and-reduce rather
    than a batched matmul (`"einsum"`): with a few query tokens it is a memory-bound
    mat-vec, and a reduction fusion reads the cache slice where it lies instead of first
    copying it into a GEMM operand. bench/generate.py times both.
    """
    B, T, N, H = q_BTNH.shape
    K = k_new_BTKH.shape[2]
    G = N // K
    q = q_BTNH.reshape(B, T, K, G, H) * jnp.asarray(H ** -0.5, q_BTNH.dtype)
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
        if impl == "einsum":
            s_old = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_BKSH,
                               preferred_element_type=jnp.float32)
        else:
            q_BKGTH = q.transpose(0, 2, 3, 1, 4).astype(jnp.float32)
            s_old = jnp.sum(q_BKGTH[:, :, :, :, None, :]
                            * k_BKSH[:, :, None, None].astype(jnp.float32), axis=-1)
        scores.insert(0, jnp.where(old_ok_BS[:, None, None, None], s_old, neg))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out = jnp.einsum("BKGTU,BUKH->BTKGH", probs[..., -T:].astype(v_new_BTKH.dtype), v_new_BTKH,
                     preferred_element_type=jnp.float32)
    if kv_cache is not None:
        if impl == "einsum":
            old = jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., :-T].astype(v_BKSH.dtype), v_BKSH,
                             preferred_element_type=jnp.float32)
        else:
            old = jnp.sum(probs[..., :-T, None] * v_BKSH[:, :, None, None].astype(jnp.float32),
                          axis=-2)  # B,K,G,T,H
        out = out + old.transpose(0, 3, 1, 2, 4)
    return out.astype(q_BTNH.dtype).reshape(B, T, N, H)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
                 kv_cache=None, slots=None):
        """Training / full forward when `slots` is None; else decoding with a KV cache
        (`slots` = (index, start_B), see `cached_attention`). Returns (out, new k/v or None,
        x_BTD for the residual's skip: `fork_dense_group`)."""
        cfg, dt = self.cfg, self.cfg.dtype
        N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        wq = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"), _init(cfg))
        wk = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), _init(cfg))
        wv = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), _init(cfg))
        wo = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"), _init(cfg))
        skip, q, k, v = fork_dense_group(("BTD,DNH->BTNH", "BSD,DKH->BSKH", "BSD,DKH->BSKH"),
                                         x_BTD, (wq, wk, wv), cfg)
        # Full-width QK-norm: normalise over (heads, head_dim) together, then RoPE.
        q = RMSNorm(cfg, axes=("heads", "head_dim"), name="q_norm")(q, positions_BT)
        k = RMSNorm(cfg, axes=("kv_heads", "head_dim"), name="k_norm")(k, positions_BT)
        q, k = checkpoint_name(q, "q_rope"), checkpoint_name(k, "k_rope")
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v.astype(dt), ("batch", "seq", "kv_heads", "head_dim"))
        if slots is None:
            out, new_kv = dot_product_attention(q, k, v, segment_ids_BT, cfg.attention), None
        else:
            out = cached_attention(q, k, v, kv_cache, *slots, impl=cfg.decode_attention)
            new_kv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # cache layout BKTH
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        return dense("BTNH,NHD->BTD", out, wo, cfg, contract=2), new_kv, skip


class MLP(nn.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down, no biases. Returns (out, x_BTD for the
    residual's skip: `fork_dense_group`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg, dt = self.cfg, self.cfg.dtype
        D, F = cfg.d_model, cfg.mlp_hidden
        w_gate = _param(self, "gate_proj", (D, F), ("embed", "mlp"), _init(cfg))
        w_up = _param(self, "up_proj", (D, F), ("embed", "mlp"), _init(cfg))
        w_down = _param(self, "down_proj", (F, D), ("mlp", "embed"), _init(cfg))
        if mlp_impl(cfg) == "pallas_grouped" and cfg.matmul == "xla" and not self.is_initializing():
            skip, h = x_BTD, _gated_grouped(x_BTD.astype(dt), w_gate, w_up, cfg)
        else:
            skip, gate, up = fork_dense_group(("BTD,DF->BTF", "BTD,DF->BTF"), x_BTD,
                                              (w_gate, w_up), cfg)
            h = _swiglu(gate, up, cfg, self.is_initializing())
        h = checkpoint_name(h, "mlp_hidden")
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return dense("BTF,FD->BTD", h, w_down, cfg), skip


def _mlp_shards(cfg: ModelConfig, shape) -> tuple[Any, tuple[int, ...]]:
    """The (batch, seq, mlp) activations' PartitionSpec over the ambient mesh (None without
    one) and their per-device shape; raises if the SwiGLU kernel cannot take that shape and
    cfg asked for it by name (returns None for the shape where "auto" falls back)."""
    mesh, spec = jax.sharding.get_abstract_mesh(), None
    if not mesh.empty and mesh.size > 1:
        spec = jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(("batch", "seq", "mlp")))
        shape = tuple(d // math.prod(mesh.shape[a] for a in _names(e))
                      for d, e in zip(shape, spec))
    if swiglu_gpu.supported(shape):
        return spec, shape
    if cfg.mlp_impl == "auto":
        return spec, None
    raise ValueError(f"config.model.mlp_impl={cfg.mlp_impl!r}: the MLP's activations {shape} (per "
                     f"device) are not whole tiles of {swiglu_gpu.TUNING['rows']} rows x a "
                     f"power of two >= {swiglu_gpu.MIN_COLS} columns; use mlp_impl='auto'")


def _swiglu(gate: Array, up: Array, cfg: ModelConfig, initializing: bool = False) -> Array:
    """silu(gate) * up; with cfg.mlp_impl "pallas", its backward in one pass per shard
    (kernels/swiglu_gpu.py). Init traces tiny shapes and needs no backward: XLA's there."""
    if mlp_impl(cfg) != "pallas" or initializing:
        return swiglu_gpu.reference(gate, up)
    _need_gpu("mlp_impl")
    spec, shape = _mlp_shards(cfg, gate.shape)
    if shape is None:
        return swiglu_gpu.reference(gate, up)
    return swiglu_gpu.swiglu(gate, up, spec=spec)


def _gated_grouped(x: Array, w_gate: Array, w_up: Array, cfg: ModelConfig) -> Array:
    """cfg.mlp_impl "pallas_grouped": both GEMMs and the gate as swiglu_gpu.gated, whose
    backward runs the gate/up input and weight gradients as one GEMM each over the kernel's
    stacked cotangent. Falls back to the separate GEMMs where the kernel cannot run."""
    _need_gpu("mlp_impl", "pallas_grouped")
    spec, shape = _mlp_shards(cfg, (*x.shape[:-1], w_gate.shape[1]))
    if shape is None:
        gate, up = dense_group(("BTD,DF->BTF", "BTD,DF->BTF"), x, (w_gate, w_up), cfg)
        return swiglu_gpu.reference(gate, up)
    return swiglu_gpu.gated(x, w_gate, w_up, f32_dw=weight_grad_dtype(cfg) == "float32",
                            spec=spec)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache=None, slots=None):
        # the skips are x_BTD and h, handed back by the blocks that project them (see
        # fork_dense_group: the residual's cotangent is then summed inside their GEMMs)
        attn, new_kv, x_skip = Attention(self.cfg, name="attn")(x_BTD, positions_BT,
                                                                segment_ids_BT, kv_cache, slots)
        h = x_skip + RMSNorm(self.cfg, name="post_attention_norm")(attn)
        mlp, h_skip = MLP(self.cfg, name="mlp")(h)
        out = h_skip + RMSNorm(self.cfg, name="post_mlp_norm")(mlp)
        out = nn.with_logical_constraint(out, ("batch", "seq", "embed"))
        return out, new_kv  # (carry, per-layer output) as nn.scan expects


class Transformer(nn.Module):
    """Token ids -> fp32 logits over the padded vocabulary."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = _param(self, "embedding", (cfg.padded_vocab_size, cfg.d_model),
                                ("vocab", "embed"), _init(cfg))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg)
        self.lm_head = _param(self, "lm_head", (cfg.d_model, cfg.padded_vocab_size),
                              ("embed", "vocab"), _init(cfg))

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> Array:
        """Final-norm hidden states (B, T, D): what the LM head (or a chunked loss) consumes."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x, _ = self._layers(self._embed(tokens_BT), positions_BT, segment_ids_BT, None, None)
        return self.final_norm(x)

    def _embed(self, tokens_BT):
        # Gather from the table with its embed dim whole (FSDP all-gathers it, as for every
        # weight); a gather from an fsdp-sharded embed dim would be fully rematerialised.
        table = nn.with_logical_constraint(self.embedding.astype(self.cfg.dtype), ("vocab", None))
        x = jnp.take(table, tokens_BT, axis=0)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    def _layers(self, x, positions_BT, segment_ids_BT, kv_cache, slots):
        """All blocks; with a cache, also the new tokens' (k, v) stacked over layers."""
        if self.cfg.scan_layers:
            return self.layers(x, positions_BT, segment_ids_BT, kv_cache, slots)
        new = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else jax.tree.map(lambda c: c[i], kv_cache)
            x, kv = layer(x, positions_BT, segment_ids_BT, layer_cache, slots)
            new.append(kv)
        stacked = None if slots is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
        return x, stacked

    def decode(self, tokens_BT, positions_BT, kv_cache, index, start_B):
        """Logits of the last new token (B, V) and the new tokens' (k, v), each
        (layers, B, kv_heads, T, head_dim), for the caller to write at cache slot `index`.

        The T new tokens sit at slots index..index+T-1 of left-padded rows whose real
        tokens start at slot `start_B`; `kv_cache` = (k, v) of shape (layers, B, K, S, H)
        (slots contiguous per head, as the decode reads them) holding slots < index, or
        None for a prefill into an empty cache.
        """
        x, new_kv = self._layers(self._embed(tokens_BT), positions_BT, None, kv_cache,
                                 (index, start_B))
        return self.logits(self.final_norm(x[:, -1:]))[:, 0], new_kv

    def logits(self, hidden_BTD: Array) -> Array:
        logits = jnp.einsum("BTD,DV->BTV", hidden_BTD.astype(self.cfg.dtype),
                            self.lm_head.astype(self.cfg.dtype),
                            preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> Array:
        return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT))
