"""Loss values, the weight-decay mask, and the schedules against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from olmo2_jax import config as config_lib
from olmo2_jax import optim
from olmo2_jax.loss import (LossConfig, cross_entropy_with_z_loss, fused_lm_head_loss,
                            logsumexp_one_pass, loss_sums)
from olmo2_jax.model import ModelConfig, Transformer


def test_ce_and_z_loss_values():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]])
    targets = jnp.array([[0, 2, 1]])
    mask = jnp.array([[1.0, 1.0, 0.0]])  # last token not counted
    lse = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + math.exp(3))]
    ce = [lse[0] - 2.0, lse[1] - 3.0]
    total, (ce_mean, z_term) = cross_entropy_with_z_loss(logits, targets, mask, 1e-5)
    assert float(ce_mean) == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert float(z_term) == pytest.approx(1e-5 * (lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    assert float(total) == pytest.approx(float(ce_mean) + float(z_term), rel=1e-7)
    assert float(loss_sums(logits, targets, mask)[2]) == 2.0


def test_z_loss_gradient_pushes_logsumexp_to_zero():
    logits = jnp.full((1, 1, 4), 3.0)
    grad = jax.grad(lambda l: cross_entropy_with_z_loss(l, jnp.zeros((1, 1), jnp.int32),
                                                        jnp.ones((1, 1)), 1.0)[0])(logits)
    grad_ce = jax.grad(lambda l: cross_entropy_with_z_loss(l, jnp.zeros((1, 1), jnp.int32),
                                                           jnp.ones((1, 1)), 0.0)[0])(logits)
    assert float(jnp.sum(grad - grad_ce)) > 0  # z-loss adds a push down on every logit


def test_weight_decay_skips_only_the_embedding():
    cfg = ModelConfig(vocab_size=64, padded_vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                      n_kv_heads=1, head_dim=8, mlp_hidden=32, dtype=jnp.float32)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    mask = optim.decay_mask(params["params"])
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat.pop("embedding") is False
    assert all(flat.values()) and "lm_head" in flat and "final_norm/scale" in flat
    assert "layers/post_attention_norm/scale" in flat  # norms ARE decayed in OLMo 2
    # And the optimiser applies it: with zero gradients only decayed params shrink.
    o = config_lib.base_config().optim
    o.warmup_steps, o.schedule = 0, "constant"
    tx, _ = optim.make_optimizer(o, 10)
    p = params["params"]
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert float(jnp.abs(updates["embedding"]).max()) == 0.0
    np.testing.assert_allclose(updates["lm_head"], -o.lr * o.weight_decay * p["lm_head"], rtol=1e-6)


def _optim(**kw):
    o = config_lib.base_config().optim
    o.update(kw)
    return o


def test_cosine_schedule_values():
    s = optim.lr_schedule(_optim(schedule="cosine", lr=1.0, warmup_steps=10, decay_steps=110), 50)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half-way down the cosine
    assert float(s(110)) == pytest.approx(0.1) and float(s(500)) == pytest.approx(0.1)


def test_linear_anneal_to_zero_and_wsd():
    s = optim.lr_schedule(_optim(schedule="linear", lr=7.4487e-5, warmup_steps=0), 100)
    assert float(s(0)) == pytest.approx(7.4487e-5) and float(s(50)) == pytest.approx(3.72435e-5)
    assert float(s(100)) == 0.0
    w = optim.lr_schedule(_optim(schedule="wsd", lr=1.0, warmup_steps=10, wsd_decay_fraction=0.2),
                          100)
    assert float(w(5)) == pytest.approx(0.5) and float(w(10)) == 1.0 and float(w(79)) == 1.0
    assert float(w(90)) == pytest.approx(0.5) and float(w(100)) == 0.0


def test_adamw_hyperparameters_match_olmo2():
    o = config_lib.base_config().optim
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)


@pytest.mark.parametrize("n_chunks", [1, 4])
def test_fused_lm_head_loss_equals_full_logits(n_chunks):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    B, T, D, V = 2, 8, 16, 40
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 0.5
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    zw = 1e-2  # large enough that a wrong z-loss gradient shows

    def full(h, w):
        ce, z, _ = loss_sums(jnp.einsum("BTD,DV->BTV", h, w), targets, mask)
        return ce + zw * z, (ce, z)

    def fused(h, w):
        loss, ce, z, _ = fused_lm_head_loss(h, w, targets, mask, LossConfig(zw, n_chunks))
        return loss, (ce, z)

    (l1, (ce1, z1)), g1 = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(h, w)
    (l2, (ce2, z2)), g2 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    for a, b in ((l1, l2), (ce1, ce2), (z1, z2)):
        assert float(b) == pytest.approx(float(a), rel=1e-5)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g2[1], g1[1], rtol=1e-4, atol=1e-6)


def test_fused_loss_with_bf16_logits_rounds_the_logits_only():
    """loss_logits_dtype="bfloat16": the loss is that of the bf16-rounded logits (what
    torch autocast computes), the softmax math stays fp32, and the gradients agree."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    B, T, D, V = 2, 8, 16, 40
    h = jax.random.normal(k[0], (B, T, D)).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (D, V)) * 2.0  # logits of ~10: bf16 rounding is visible
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    zw = 1e-2

    def rounded(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        ce, z, _ = loss_sums(logits.astype(jnp.bfloat16), targets, mask)
        return ce + zw * z

    def fused(h, w, dtype):
        return fused_lm_head_loss(h, w, targets, mask, LossConfig(zw, 2, dtype))[0]

    l_ref, g_ref = jax.value_and_grad(rounded, argnums=(0, 1))(h, w)
    l_bf16, g_bf16 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)), static_argnums=2)(
        h, w, "bfloat16")
    l_f32 = jax.jit(fused, static_argnums=2)(h, w, "float32")
    assert float(l_bf16) == pytest.approx(float(l_ref), rel=1e-6)
    assert abs(float(l_f32) - float(l_ref)) > 1e-4  # the rounding is real at this scale
    np.testing.assert_allclose(np.asarray(g_bf16[1]), np.asarray(g_ref[1]), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(g_bf16[0], np.float32), np.asarray(g_ref[0], np.float32),
                               rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("settings,match", [
    ({"loss_chunks": 0, "loss_logits_dtype": "bfloat16"}, "loss_chunks"),
    ({"loss_logits_dtype": "fp16"}, "loss_logits_dtype"),
])
def test_config_rejects_loss_settings_the_loss_cannot_run(settings, match):
    c = config_lib.base_config()
    c.train.update(settings)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c, 1)


def test_logsumexp_one_pass_matches_two_passes():
    """The fused loss's one-pass logsumexp equals jax.nn.logsumexp: random rows, rows whose
    max comes late or early, huge and tiny magnitudes, and rows with -inf entries."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 1000)) * 4
    x = x.at[0, 0].set(jnp.arange(1000.0)).at[0, 1].set(-jnp.arange(1000.0))
    x = x.at[1, 0].multiply(1e4).at[1, 1, :500].set(-jnp.inf).at[2, 0].set(1e-30)
    np.testing.assert_allclose(logsumexp_one_pass(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6,
                               atol=1e-5)
    assert np.isneginf(logsumexp_one_pass(jnp.full((2, 4), -jnp.inf))).all()


def test_fused_loss_kernel_passes_match_xla(monkeypatch):
    """model.kernels='auto' on a GPU: with the passes of kernels/xent_gpu in Pallas'
    interpreter, the loss and both gradients match XLA's, for fp32 and bf16 logits, on one
    device and per shard of rows on a data x fsdp mesh. Where the mesh splits the vocabulary,
    or a chunk does not tile, XLA runs them; on the CPU 'auto' is XLA."""
    import functools

    from kernels import xent_gpu
    from olmo2_jax import ops, sharding

    B, T, D, V = 8, 32, 32, 256
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    h = jax.random.normal(k[0], (B, T, D)).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (D, V)) * 0.5
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)

    def loss(kernels, dtype="bfloat16", vocab=V):
        def f(h, w):
            cfg = LossConfig(1e-2, 2, dtype, kernels)
            return fused_lm_head_loss(h, w, targets % vocab, mask, cfg)[0]
        return f, (h, w[:, :vocab])

    def run(kernels, dtype="bfloat16", vocab=V):
        f, args = loss(kernels, dtype, vocab)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)

    def n_kernels(kernels, vocab=V):
        f, args = loss(kernels, vocab=vocab)
        return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args)).count("pallas_call")

    def same(dtype):
        (l, (dh, dw)), (l_ref, (dh_ref, dw_ref)) = run("auto", dtype), run("xla", dtype)
        assert float(l) == pytest.approx(float(l_ref), rel=1e-6)
        for got, ref in ((dh, dh_ref), (dw, dw_ref)):
            got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
            np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.max(np.abs(ref)))

    assert n_kernels("auto") == 0
    with pytest.raises(ValueError, match="config.model.kernels='fast'"):
        run("fast")

    monkeypatch.setattr(ops, "current_platform", lambda: "gpu")
    for name in ("logsumexp", "softmax_grad"):
        monkeypatch.setattr(xent_gpu, name, functools.partial(getattr(xent_gpu, name),
                                                              interpret=True))
    monkeypatch.setitem(xent_gpu.TUNING, "lse", {"rows": 4, "cols": 128, "num_warps": 4})
    monkeypatch.setitem(xent_gpu.TUNING, "grad", {"rows": 8, "cols": 64, "num_warps": 4})
    assert n_kernels("auto") == 2 and n_kernels("xla") == 0  # the two passes, in the scan
    for dtype in ("float32", "bfloat16"):
        same(dtype)
    assert n_kernels("auto", vocab=200) == 0  # 200 does not tile into 128 columns

    def mesh(*shape):
        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)

    with jax.set_mesh(mesh(2, 4, 1)), nn.logical_axis_rules(sharding.RULES):
        f, args = loss("auto")
        assert "shard_map" in str(jax.make_jaxpr(jax.grad(f))(*args))
        same("bfloat16")
    with jax.set_mesh(mesh(1, 4, 2)), nn.logical_axis_rules(sharding.RULES):
        assert n_kernels("auto") == 0  # the vocabulary is split over 'tensor'
