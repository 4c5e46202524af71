"""Step guard: non-finite detection and the skip-step rule, pure and on device.

A step is *skipped* when its loss or gradient norm is not finite or, with the rule on,
when either is more than `sigma` standard deviations above its mean over the last
`window` accepted steps (the rule of the OLMo 2 32B run, OLMo-core's SkipStepOptimizer).
A skipped step leaves params and the optimiser moments untouched; the step counters (the
state's and optax's) still advance, so the LR schedule and the data position move on as
if the step had been taken (as in OLMo-core, where the trainer's step drives the schedule).
The window lives in the TrainState, so it is saved with the checkpoint and a resume
decides exactly as the uninterrupted run would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(window: int) -> dict | None:
    """The rolling window of (loss, grad_norm) of accepted steps; None when the rule is off."""
    if window <= 0:
        return None
    return {"history": jnp.zeros((window, 2), jnp.float32), "count": jnp.zeros((), jnp.int32)}


def check(guard: dict | None, loss: jax.Array, grad_norm: jax.Array, sigma: float):
    """(ok, new_guard). `ok` is False for a non-finite or (rule on) spiking step. The rule
    only fires once half the window (at least 2 steps) has been seen."""
    values = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    ok = jnp.all(jnp.isfinite(values))
    if guard is None:
        return ok, None
    history, count = guard["history"], guard["count"]
    window = history.shape[0]
    seen = jnp.minimum(count, window)
    valid = (jnp.arange(window) < seen)[:, None]
    n = jnp.maximum(seen, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, history, 0.0), axis=0) / n
    var = jnp.sum(jnp.where(valid, (history - mean) ** 2, 0.0), axis=0) / n
    spike = (seen >= max(2, window // 2)) & jnp.any(values > mean + sigma * jnp.sqrt(var))
    ok = ok & ~spike
    new_history = jnp.where(ok, history.at[count % window].set(values), history)
    return ok, {"history": new_history, "count": count + ok.astype(jnp.int32)}


def select(ok: jax.Array, new, old):
    """Float leaves (params, moments) from `new` where ok else `old`; integer leaves
    (optax step counts, which drive the LR schedule) always from `new`, so a skipped step
    moves the schedule on like the state's step counter."""
    def pick(a, b):
        return jnp.where(ok, a, b) if jnp.issubdtype(a.dtype, jnp.inexact) else a
    return jax.tree.map(pick, new, old)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every float leaf is finite: checked before each save."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
