"""Causal flash attention (GQA, document masking) on Pallas: one public function.

`flash_attention` takes the model's layout (B,T,N,H queries, B,S,K,H keys/values with N a
multiple of K, so K/V are never repeated in memory), pads T to the block, and runs the
Mosaic TPU kernels (`flash_attention_tpu`), the Triton-lowered GPU kernels
(`flash_attention_gpu`) or the Hopper Mosaic GPU kernels (`flash_attention_mgpu`) under one
`jax.custom_vjp`. `reference_attention` is the plain-JAX definition the kernels are tested
against. bf16 in, fp32 softmax statistics and
accumulation, softmax scale 1/sqrt(H).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import flash_attention_gpu, flash_attention_mgpu, flash_attention_tpu

_KERNELS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu, "mgpu": flash_attention_mgpu}
BACKENDS = tuple(_KERNELS)
HEAD_DIMS = (64, 128)
RESIDUAL_NAMES = ("flash_attention_out", "flash_attention_lse")
DTYPES = (jnp.bfloat16, jnp.float32)


def reference_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None):
    """Causal softmax attention in fp32 with GQA by head grouping; the kernels' definition."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_BSKH.astype(jnp.float32)) * H**-0.5
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None, None]
    if segment_ids_BT is not None:
        same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask = mask & same[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v_BSKH.astype(jnp.float32))
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


def current_platform() -> str:
    """The platform being compiled for: the ambient mesh's devices when a mesh is set (right
    for ahead-of-time compiles for a TPU from a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def default_backend() -> str:
    """The kernel family for the platform being compiled for. On GPUs: the Hopper Mosaic GPU
    kernels on sm90 (faster than the Triton-lowered ones and cuDNN's at B8 T4096,
    docs/kernels.md), the Triton-lowered kernels on other GPUs and when no GPU is attached
    (ahead-of-time lowering)."""
    platform = current_platform()
    if platform == "gpu":
        arch = _local_gpu_arch()
        return "mgpu" if arch is not None and arch.startswith("9.") else "gpu"
    if platform == "tpu":
        return platform
    raise ValueError(f"flash_attention: no Pallas kernel for platform {platform!r}; "
                     "use interpret=True with backend='tpu' or 'gpu' on the CPU, or "
                     "config.model.attention='xla'")


def _local_gpu_arch() -> str | None:
    """The compute capability ("9.0") of the local GPU, None without one."""
    try:
        return getattr(jax.local_devices(backend="gpu")[0], "compute_capability", None)
    except (RuntimeError, ValueError):  # no GPU backend on this host
        return None


def _check(q, k, v, segment_ids, backend):
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend={backend!r}; choose one of {BACKENDS}")
    arch = _local_gpu_arch() if backend == "mgpu" else None
    if arch is not None and not arch.startswith("9."):
        # wgmma and the TMA layouts these kernels use exist on sm90 only; the failure would
        # otherwise surface as a Mosaic compile error deep inside the step's compile
        raise ValueError(f"flash_attention: backend='mgpu' needs a Hopper GPU (sm90), this one "
                         f"is sm{arch.replace('.', '')}; use backend='gpu' (Triton kernels) "
                         "or config.model.attention='cudnn'")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: want q (B,T,N,H) and k, v (B,T,K,H) of one shape; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, N, H = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != H:
        raise ValueError(f"flash_attention: k/v {k.shape} do not match q {q.shape} in B, T or H "
                         "(self-attention only)")
    if N % k.shape[2]:
        raise ValueError(f"flash_attention: {N} query heads not a multiple of {k.shape[2]} "
                         "kv heads (GQA needs n_heads % n_kv_heads == 0)")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"flash_attention: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}; want one "
                         "of bfloat16 (fp32 accumulation) or float32 for all three")
    if H not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim={H}; the kernels support {HEAD_DIMS}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"flash_attention: segment_ids {segment_ids.shape}, want {(B, T)}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, backend: str | None = None,
                    block_q: int | None = None, block_k: int | None = None,
                    interpret: bool = False):
    """Causal GQA attention, optional document masking by segment ids, Pallas kernels.

    backend: "tpu", "gpu" (Triton lowering, any CUDA GPU) or "mgpu" (Mosaic GPU, Hopper;
    bf16 without segment ids, else it falls back to "gpu"); default: the platform being
    compiled for. interpret: run the kernels in Pallas interpret mode (CPU tests).
    block_q/block_k: tile sizes (defaults per backend; on TPU for all three kernels, on GPU
    for the forward, the backward has its own).
    Any T works: q/k/v are zero-padded to the block; causality keeps the padded keys away
    from the real queries, and the padded rows are dropped.
    """
    backend = backend or default_backend()
    _check(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, backend)
    if backend == "mgpu" and (segment_ids_BT is not None or interpret
                              or q_BTNH.dtype != jnp.bfloat16):
        backend = "gpu"
    T = q_BTNH.shape[1]
    bq, bk = _KERNELS[backend].block_sizes(T, block_q, block_k)
    Tp = _round_up(T, max(bq, bk))
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q_BTNH, k_BSKH, v_BSKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BSKH, v_BSKH))
        if segment_ids_BT is not None:
            segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, Tp - T)), constant_values=-1)
    if segment_ids_BT is not None:
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    out = _flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, (backend, bq, bk, interpret))
    return out[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, opts):
    return _flash_fwd(q, k, v, seg, opts)[0]


def _flash_fwd(q, k, v, seg, opts):
    backend, bq, bk, interpret = opts
    out, lse = _KERNELS[backend].forward(q, k, v, seg, block_q=bq, block_k=bk, interpret=interpret)
    # Named so a remat policy can keep them (`RESIDUAL_NAMES`) and skip the forward re-run.
    out, lse = checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(opts, res, d_out):
    backend, bq, bk, interpret = opts
    q, k, v, seg, out, lse = res
    dq, dk, dv = _KERNELS[backend].backward(q, k, v, seg, out, lse, d_out, block_q=bq, block_k=bk,
                                        interpret=interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
