"""Cross entropy + z-loss over counted tokens.

Returns sums (not means) so that gradient accumulation over micro-batches normalises by
the token count of the whole batch, exactly as one big batch would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
