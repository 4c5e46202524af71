"""Sharded == unsharded: one train step on 8 devices (fsdp=4, tensor=2) vs on 1 device."""

import runpy

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from olmo2_jax import optim, sharding, train
from olmo2_jax.model import ModelConfig, Transformer


def small_config(**mesh):
    c = runpy.run_path("configs/tiny.py")["get_config"]()
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128,
                   vocab_size=512, padded_vocab_size=512)
    c.data.seq_len = 32
    c.train.global_batch_size = 8
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.mesh.update(mesh)
    return c


def run_step(c, devices, accum=1):
    mesh = sharding.make_mesh(c, devices)
    model = Transformer(ModelConfig.from_config(c.model))
    tx, schedule = optim.make_optimizer(c.optim, c.train.steps)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.model.vocab_size, (c.train.global_batch_size, c.data.seq_len + 1))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "loss_mask": (rng.random(tokens[:, 1:].shape) > 0.2).astype(np.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, shardings = train.create_state(model, tx, mesh, jax.random.PRNGKey(0))
        bs = sharding.batch_sharding(mesh)
        batch = {k: jax.device_put(v, bs) for k, v in batch.items()}
        step = jax.jit(train.make_train_step(model, tx, schedule,
                                             train.LossConfig(z_loss_weight=1e-5, chunks=0),
                                             accum_steps=accum, mesh=mesh),
                       in_shardings=(shardings, bs), out_shardings=(shardings, None))
        new_state, metrics = step(state, batch)
        return state, new_state, jax.device_get(metrics)


def test_sharded_step_equals_unsharded():
    c = small_config(data=1, fsdp=4, tensor=2)
    state8, new8, m8 = run_step(c, jax.devices()[:8])
    # The state really is sharded over both axes (and never whole on one device).
    q = state8.params["layers"]["attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    mu = state8.opt_state[1][0].mu["layers"]["attn"]["q_proj"]
    assert mu.sharding.spec == q.sharding.spec
    c1 = small_config(data=1, fsdp=1, tensor=1)
    state1, new1, m1 = run_step(c1, jax.devices()[:1])
    np.testing.assert_array_equal(np.asarray(state8.params["embedding"]),
                                  np.asarray(state1.params["embedding"]))
    for key in ("loss", "z_loss", "grad_norm"):
        assert abs(m8[key] - m1[key]) <= 1e-5 * abs(m1[key]), (key, m8[key], m1[key])
    # Adam's first update is lr * g / (|g| + eps): rounding in g of entries with |g| ~ eps
    # moves them by up to ~lr, so params are compared at a fraction of lr.
    np.testing.assert_allclose(np.asarray(new8.params["lm_head"]),
                               np.asarray(new1.params["lm_head"]), atol=1e-3 * c.optim.lr)


def test_gradient_accumulation_equals_one_big_batch():
    c = small_config(data=2, fsdp=2, tensor=2)
    _, new_full, m_full = run_step(c, jax.devices()[:8], accum=1)
    _, new_acc, m_acc = run_step(c, jax.devices()[:8], accum=2)
    for key in ("loss", "grad_norm"):
        assert abs(m_full[key] - m_acc[key]) <= 1e-5 * abs(m_full[key]), key
    assert m_full["loss_tokens"] == m_acc["loss_tokens"]
    np.testing.assert_allclose(np.asarray(new_acc.params["lm_head"]),
                               np.asarray(new_full.params["lm_head"]), atol=1e-3 * c.optim.lr)


def test_state_creation_never_runs_an_attention_kernel():
    """Init traces the model on a 1x1 batch: with Pallas attention under a mesh whose batch
    axes span 4 devices that batch cannot be split, so init must not go through the kernel."""
    c = small_config(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(c, jax.devices()[:8])
    cfg = ModelConfig(vocab_size=256, padded_vocab_size=256, d_model=128, n_layers=1,
                      n_heads=2, n_kv_heads=2, head_dim=64, mlp_hidden=128,
                      dtype=jnp.float32, attention="pallas")
    tx, _ = optim.make_optimizer(c.optim, 10)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, _ = train.create_state(Transformer(cfg), tx, mesh, jax.random.PRNGKey(0))
    assert state.params["layers"]["attn"]["q_proj"].shape == (1, 128, 2, 64)
