"""Cross entropy + z-loss over counted tokens.

Returns sums (not means) so that gradient accumulation over micro-batches normalises by
the token count of the whole batch, exactly as one big batch would.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import xent_gpu
from olmo2_jax import ops


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How a stage's token loss is computed: one frozen value from the config.

    chunks > 0: the fused LM head + loss over that many sequence chunks (no [B, T, V]
    logits); 0: full logits. logits_dtype: what the fused LM-head matmul writes ("bfloat16"
    rounds as torch autocast does); kernels: config.model.kernels (ops.xent_rows)."""

    z_loss_weight: float = 1e-5
    chunks: int = 8
    logits_dtype: str = "float32"
    kernels: str = "auto"

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        t = config.train
        return cls(z_loss_weight=float(t.z_loss_weight), chunks=int(t.loss_chunks),
                   logits_dtype=t.loss_logits_dtype, kernels=config.model.kernels)


def loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array):
    """Returns (sum of CE, sum of logsumexp^2, count) over tokens where mask is nonzero.

    The z-loss (PaLM; OLMo 2 uses weight 1e-5) keeps logsumexp near 0 so logits cannot
    drift, which is one of OLMo 2's stability fixes.
    """
    logits = logits_BTV.astype(jnp.float32)
    mask = mask_BT.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)
    ce = (lse - target_logit[..., 0]) * mask
    z = jnp.square(lse) * mask
    return jnp.sum(ce), jnp.sum(z), jnp.sum(mask)


def cross_entropy_with_z_loss(logits_BTV, targets_BT, mask_BT, z_loss_weight: float):
    """Mean CE and weighted mean z-loss: (ce + w * z, (ce, w * z))."""
    ce, z, n = loss_sums(logits_BTV, targets_BT, mask_BT)
    n = jnp.maximum(n, 1.0)
    return (ce + z_loss_weight * z) / n, (ce / n, z_loss_weight * z / n)


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis in one read of x: a variadic reduce carrying (running max,
    sum of exp(x - running max)), rescaled as the max grows (the online softmax's rule).
    jax.nn.logsumexp reads x twice, once for the max and once for the sum; over the loss
    chunk's [B, T/n, V] logits that second pass costs ~3 ms per 1B step at batch 8."""
    def combine(a, b):
        (ma, sa), (mb, sb) = a, b
        m = jnp.maximum(ma, mb)
        base = jnp.where(jnp.isneginf(m), 0.0, m)  # both empty: keep exp finite
        return m, sa * jnp.exp(ma - base) + sb * jnp.exp(mb - base)

    x = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (np.float32(-np.inf), np.float32(0.0)),
                          combine, (x.ndim - 1,))
    return m + jnp.log(s)


def fused_lm_head_loss(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                       mask_BT: jax.Array, cfg: LossConfig):
    """LM head + CE + z-loss without materialising the [B, T, V] logits.

    `hidden_BTD` is in the compute dtype, `w_DV` the (fp32) LM head weight.
    Returns (loss_sum, ce_sum, z_sum, count) where loss_sum = ce_sum + w * z_sum. Only
    loss_sum is differentiable (the rest are metrics; their cotangents are ignored).
    The sequence is cut into `cfg.chunks` pieces scanned one at a time; each piece's
    gradient is computed in the forward pass (the loss is the end of the graph), so the
    step runs the three LM-head matmuls once each, all in the compute dtype, with the
    logits alive for one chunk only. The softmax math is fp32 whatever `cfg.logits_dtype`.
    Its two passes over each chunk (logsumexp, softmax gradient) run on kernels/xent_gpu.py
    where `ops.xent_rows` says so.
    """
    B, T, _ = hidden_BTD.shape
    impl = ops.xent_rows(cfg.kernels, (B * (T // cfg.chunks), w_DV.shape[1]))
    loss, ce, z = _fused(hidden_BTD, w_DV, targets_BT.astype(jnp.int32),
                         mask_BT.astype(jnp.float32), float(cfg.z_loss_weight), int(cfg.chunks),
                         jnp.dtype(cfg.logits_dtype).name, impl)
    return loss, ce, z, jnp.sum(mask_BT.astype(jnp.float32))


def _fused_scan(h, w, targets, mask, zw, n_chunks, logits_dtype, impl, with_grads):
    B, T, D = h.shape
    V = w.shape[1]
    wc = w.astype(h.dtype)  # matmuls in the compute dtype; dw accumulates in fp32

    def split(x):  # [B, T, ...] -> [n_chunks, B, T / n_chunks, ...]; B keeps its sharding
        return jnp.moveaxis(x.reshape(B, n_chunks, T // n_chunks, *x.shape[2:]), 1, 0)

    def body(dw, xs):
        h_c, t_c, m_c = xs
        logits = jnp.einsum("BTD,DV->BTV", h_c, wc,
                            preferred_element_type=jnp.dtype(logits_dtype))
        rows = logits.reshape(-1, V)
        if impl != "xla":  # the Pallas passes, per shard of rows over the mesh axes `impl`
            lse = xent_gpu.logsumexp(rows, row_axes=impl).reshape(t_c.shape)
        else:
            logits = logits.astype(jnp.float32)  # fused into the passes that read it
            lse = logsumexp_one_pass(logits)
        tgt = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0].astype(jnp.float32)
        ce, z = jnp.sum((lse - tgt) * m_c), jnp.sum(jnp.square(lse) * m_c)
        if not with_grads:
            return dw, (ce, z)
        # d(ce + zw * z)/d logits = softmax * (1 + 2 zw lse) - onehot(target), masked.
        coef = (1.0 + 2.0 * zw * lse) * m_c
        if impl != "xla":
            g = xent_gpu.softmax_grad(rows, lse.reshape(-1), coef.reshape(-1), t_c.reshape(-1),
                                      m_c.reshape(-1), h.dtype, row_axes=impl)
            g = g.reshape(logits.shape)
        else:
            g = jnp.exp(logits - lse[..., None]) * coef[..., None]
            g = g - jax.nn.one_hot(t_c, V, dtype=jnp.float32) * m_c[..., None]
            g = g.astype(h.dtype)
        dh_c = jnp.einsum("BTV,DV->BTD", g, wc)
        dw = dw + jnp.einsum("BTD,BTV->DV", h_c, g, preferred_element_type=jnp.float32)
        return dw, (ce, z, dh_c)

    dw0 = jnp.zeros((D, V), jnp.float32) if with_grads else None
    dw, out = jax.lax.scan(body, dw0, (split(h), split(targets), split(mask)))
    ce, z = jnp.sum(out[0]), jnp.sum(out[1])
    if not with_grads:
        return ce, z
    dh = jnp.moveaxis(out[2], 0, 1).reshape(B, T, D)
    return ce, z, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(h, w, targets, mask, zw, n_chunks, logits_dtype, impl):
    ce, z = _fused_scan(h, w, targets, mask, zw, n_chunks, logits_dtype, impl,
                        with_grads=False)
    return ce + zw * z, ce, z


def _fused_fwd(h, w, targets, mask, zw, n_chunks, logits_dtype, impl):
    ce, z, dh, dw = _fused_scan(h, w, targets, mask, zw, n_chunks, logits_dtype, impl,
                                with_grads=True)
    return (ce + zw * z, ce, z), (dh, dw.astype(w.dtype), targets, mask)  # w is fp32: exact


def _fused_bwd(zw, n_chunks, logits_dtype, impl, res, cts):
    dh, dw, targets, mask = res
    ct = cts[0]
    return ((ct * dh).astype(dh.dtype), (ct * dw).astype(dw.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(mask))


_fused.defvjp(_fused_fwd, _fused_bwd)
