"""AdamW (decay on everything but the token embedding), clipping, LR schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

EMBEDDING_PARAM = "embedding"


def lr_schedule(o, train_steps: int) -> optax.Schedule:
    """config.optim -> schedule. The horizon is optim.decay_steps (0 = train.steps).

    cosine:   linear warmup from 0, cosine to lr * final_lr_ratio at the horizon (stage 1).
    linear:   linear warmup (usually 0 steps), then linear to exactly 0 (stage-2 anneal).
    wsd:      warmup, constant, then linear to 0 over the last wsd_decay_fraction.
    constant: warmup, then constant.
    """
    horizon, warmup, lr = o.decay_steps or train_steps, o.warmup_steps, o.lr
    warm = optax.linear_schedule(0.0, lr, warmup)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, horizon, lr * o.final_lr_ratio)
    if o.schedule == "linear":
        rest = optax.linear_schedule(lr, 0.0, max(horizon - warmup, 1))
        return optax.join_schedules([warm, rest], [warmup]) if warmup else rest
    if o.schedule == "wsd":
        decay = max(int(round(horizon * o.wsd_decay_fraction)), 1)
        stable = max(horizon - decay - warmup, 0)
        return optax.join_schedules(
            [warm, optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)],
            [warmup, warmup + stable])
    if o.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"config.optim.schedule={o.schedule!r} is not a known schedule")


def decay_mask(params):
    """True for every parameter except the token embedding (as OLMo 2; norms ARE decayed)."""
    def keep(path, _):
        return not any(getattr(k, "key", None) == EMBEDDING_PARAM for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(o, train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW(b1, b2, eps, wd, mask); returns (tx, schedule)."""
    schedule = lr_schedule(o, train_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask))
    return tx, schedule


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))
