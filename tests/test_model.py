"""The model against the public transformers Olmo2 (parity), and its basic invariants."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from olmo2_jax import sharding
from olmo2_jax.convert import to_hf_state_dict
from olmo2_jax import ops
from olmo2_jax.model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=500, padded_vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                   n_kv_heads=2, head_dim=16, mlp_hidden=96, rope_theta=500_000.0,
                   dtype=jnp.float32, remat="none")


def init(cfg, seed=0, T=8):
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32)))["params"]
    return model, params


def test_logits_match_transformers_olmo2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = TINY
    model, params = init(cfg)
    # Perturb norm scales so a swapped or missing norm cannot hide behind all-ones weights.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape))
        if getattr(path[-1], "key", "") == "scale" else x, params)
    hf_cfg = transformers.Olmo2Config(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=64, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        attention_bias=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        bos_token_id=1)
    hf = transformers.Olmo2ForCausalLM(hf_cfg).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(params, cfg)}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits():
    model, params = init(TINY)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, TINY.vocab_size)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % TINY.vocab_size)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_segment_ids_keep_attention_inside_documents():
    model, params = init(TINY)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 12), 0, TINY.vocab_size)
    seg = jnp.array([[0] * 5 + [1] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    packed = model.apply({"params": params}, tokens, pos, seg)
    alone = model.apply({"params": params}, tokens[:, 5:])
    np.testing.assert_allclose(np.asarray(packed[:, 5:]), np.asarray(alone), atol=1e-5)


def test_scan_and_unrolled_and_remat_agree():
    _, params = init(TINY)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, TINY.vocab_size)
    ref = Transformer(TINY).apply({"params": params}, tokens)
    for policy in ("dots", "full"):
        remat = Transformer(TINY.__class__(**{**TINY.__dict__, "remat": policy}))
        loss = lambda p, m: jnp.sum(m.apply({"params": p}, tokens) ** 2)  # noqa: E731
        np.testing.assert_allclose(remat.apply({"params": params}, tokens), ref, atol=1e-6)
        g_ref = jax.grad(loss)(params, Transformer(TINY))
        g = jax.grad(loss)(params, remat)
        np.testing.assert_allclose(g["lm_head"], g_ref["lm_head"], rtol=1e-5, atol=1e-6)
    unrolled_cfg = TINY.__class__(**{**TINY.__dict__, "scan_layers": False})
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(TINY.n_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    out = Transformer(unrolled_cfg).apply({"params": unrolled}, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_init_truncated_normal_and_ones():
    cfg = ModelConfig(vocab_size=4096, padded_vocab_size=4096, d_model=256, n_layers=1,
                      n_heads=4, n_kv_heads=4, head_dim=64, mlp_hidden=512, dtype=jnp.float32)
    _, params = init(cfg)
    emb = np.asarray(params["embedding"])
    assert np.abs(emb).max() <= 3 * 0.02 + 1e-7
    assert abs(emb.std() - 0.02 * 0.9866) < 5e-4  # std of N(0, 0.02) cut at +-3 std
    assert np.all(np.asarray(params["layers"]["post_mlp_norm"]["scale"]) == 1.0)
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (1, 4, 64)


def test_rope_is_a_rotation_by_position():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    y = ops.apply_rope(x, pos, 10_000.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-7)  # position 0: identity


def _loss(cfg, params, tokens):
    return jnp.mean(Transformer(cfg).apply({"params": params}, tokens).astype(jnp.float32) ** 2)


def _assert_same_loss_and_grads(cfg, cfg_ref, params, tokens):
    """Against a reference path: the loss, and every gradient to 2% of its max."""
    loss = jax.jit(_loss, static_argnums=0)  # jitted: eager op-by-op runs are slow on the CPU
    np.testing.assert_allclose(loss(cfg, params, tokens), loss(cfg_ref, params, tokens),
                               rtol=1e-3)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    g, g_ref = (grad(c, params, tokens) for c in (cfg, cfg_ref))
    for path, ref in jax.tree_util.tree_leaves_with_path(g_ref):
        got = np.asarray(functools.reduce(lambda t, k: t[k.key], path, g), np.float32)
        ref = np.asarray(ref, np.float32)
        assert np.max(np.abs(got - ref)) <= 0.02 * np.max(np.abs(ref)) + 1e-8, path


def _mesh(*shape):
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)


KERNEL_CFG = ModelConfig(vocab_size=512, padded_vocab_size=512, d_model=256, n_layers=2,
                         n_heads=2, n_kv_heads=2, head_dim=128, mlp_hidden=512,
                         scan_layers=False, attention="xla", remat="dots", kernels="xla")


def test_kernels_auto_matches_xla_on_one_device_and_per_shard(monkeypatch):
    """model.kernels='auto' on a GPU (the kernels in Pallas' interpreter): the loss and every
    gradient match kernels='xla' under remat "dots" (the kernels' residuals are the saved
    GEMM outputs), on one device and per shard on a data x fsdp mesh. Per layer the backward
    runs 2 post-norms, QK-norm + RoPE for q and k and SwiGLU as one kernel each, plus the
    final norm; where the mesh splits the heads, QK-norm stays on XLA; tokens that are no
    whole tiles take XLA's paths. On the CPU 'auto' is XLA, bit for bit."""
    from kernels import rmsnorm_gpu, swiglu_gpu

    xla, auto = KERNEL_CFG, dataclasses.replace(KERNEL_CFG, kernels="auto")
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 64), 0, xla.vocab_size)
    _, params = init(xla)
    np.testing.assert_array_equal(jax.jit(_loss, static_argnums=0)(auto, params, tokens),
                                  jax.jit(_loss, static_argnums=0)(xla, params, tokens))

    monkeypatch.setattr(ops, "current_platform", lambda: "gpu")
    for name in ("rms_norm", "rms_norm_rope"):
        monkeypatch.setattr(rmsnorm_gpu, name,
                            functools.partial(getattr(rmsnorm_gpu, name), interpret=True))
    monkeypatch.setattr(swiglu_gpu, "swiglu", functools.partial(swiglu_gpu.swiglu, interpret=True))

    def kernels(c, t):
        return str(jax.make_jaxpr(jax.grad(lambda p: _loss(c, p, t)))(params)).count("pallas_call")

    assert kernels(auto, tokens) == 2 * 5 + 1 and kernels(xla, tokens) == 0
    assert kernels(auto, tokens[:1, :3]) == 0
    _assert_same_loss_and_grads(auto, xla, params, tokens)

    tokens = tokens.reshape(8, 16)
    with jax.set_mesh(_mesh(2, 4, 1)), nn.logical_axis_rules(sharding.RULES):
        assert "shard_map" in str(jax.make_jaxpr(jax.grad(lambda p: _loss(auto, p, tokens)))(
            params))
        _assert_same_loss_and_grads(auto, xla, params, tokens)
    with jax.set_mesh(_mesh(1, 4, 2)), nn.logical_axis_rules(sharding.RULES):
        assert kernels(auto, tokens) == 2 * 3 + 1  # QK-norm + RoPE on XLA: heads split
        _assert_same_loss_and_grads(auto, xla, params, tokens)


def test_kernels_lower_for_cuda_per_shard_on_a_mesh(monkeypatch):
    """On a data x fsdp mesh the defaults ('auto', on a GPU) lower each norm's backward, QK-norm
    + RoPE's and SwiGLU's as one Triton kernel each inside a manual (shard_map) computation:
    per layer 2 norms, 2 QK-norms, 1 SwiGLU; plus the final norm."""
    import re

    monkeypatch.setattr(ops, "current_platform", lambda: "gpu")
    m = Transformer(dataclasses.replace(KERNEL_CFG, kernels="auto"))
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
    with jax.set_mesh(_mesh(2, 4, 1)), nn.logical_axis_rules(sharding.RULES):
        text = jax.jit(jax.grad(lambda p, t: m.apply(p, t).astype(jnp.float32).mean())).trace(
            params, jax.ShapeDtypeStruct((8, 64), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 2 * 5 + 1
    assert "rmsnorm_rope_bwd" in text and "swiglu_bwd" in text
    assert "sdy.manual_computation" in text or 'mhlo.sharding = "{manual}"' in text


@pytest.mark.parametrize("spec,x_shape,w_shape,contract", [
    ("BTD,DF->BTF", (2, 32, 64), (64, 96), 1),
    ("BTD,DNH->BTNH", (2, 32, 64), (64, 4, 16), 1),
    ("BTNH,NHD->BTD", (2, 32, 4, 16), (4, 16, 64), 2),
])
def test_dense_writes_the_fp32_weight_grad_bf16_autodiff_rounds(spec, x_shape, w_shape,
                                                                contract):
    """ops.dense in bf16: the same forward and input gradient as autodiff of the bf16 einsum,
    bit for bit, and a weight gradient equal to the fp32 product of the bf16 operands, where
    autodiff's is that product rounded to bf16."""
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jax.random.normal(kx, x_shape, jnp.bfloat16)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    dy = jax.random.normal(ky, x_shape[:-contract] + w_shape[contract:], jnp.bfloat16)
    y32, vjp32 = jax.vjp(lambda x, w: ops.dense(spec, x, w, jnp.bfloat16), x, w)
    y16, vjp16 = jax.vjp(lambda x, w: jnp.einsum(spec, x, w.astype(jnp.bfloat16)), x, w)
    np.testing.assert_array_equal(y32, y16)
    (dx32, dw32), (dx16, dw16) = vjp32(dy), vjp16(dy)
    np.testing.assert_array_equal(dx32, dx16)
    assert dw32.dtype == dw16.dtype == jnp.float32
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    exact = np.einsum(f"{lhs},{out}->{rhs}", np.asarray(x, np.float64), np.asarray(dy, np.float64))
    scale = np.max(np.abs(exact))
    assert np.max(np.abs(dw32 - exact)) < 1e-5 * scale
    assert np.max(np.abs(dw16 - exact)) > 1e-4 * scale  # bf16 keeps 8 bits: ~2e-3 relative
    np.testing.assert_array_equal(dw16, np.asarray(jnp.asarray(exact, jnp.float32)
                                                   .astype(jnp.bfloat16), np.float32))


def test_bf16_model_sharded_matches_unsharded_and_remat_saves_the_gemms():
    """The bf16 model (fp32 weight-gradient GEMMs): the loss and gradients on a data x fsdp x
    tensor mesh match one device's; remat 'dots' keeps the custom-VJP GEMM outputs, so the
    backward re-runs no weight GEMM (only XLA attention's two batched dots)."""
    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, remat="dots", attention="xla")
    tokens = jax.random.randint(jax.random.PRNGKey(7), (8, 16), 0, cfg.vocab_size)
    _, params = init(cfg)

    def gemms(c):
        hlo = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0).lower(
            c, params, tokens).compile().as_text()
        return hlo.count(" dot(")

    assert gemms(cfg) - gemms(dataclasses.replace(cfg, remat="none")) == 2
    loss, grad = jax.jit(_loss, static_argnums=0), jax.jit(jax.grad(_loss, argnums=1),
                                                           static_argnums=0)
    ref_loss, ref = loss(cfg, params, tokens), grad(cfg, params, tokens)
    with jax.set_mesh(_mesh(2, 2, 2)), nn.logical_axis_rules(sharding.RULES):
        got_loss, got = loss(cfg, params, tokens), grad(cfg, params, tokens)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(b)) + 1e-8


def test_model_config_takes_every_model_key():
    """ModelConfig.from_config copies config.model by name: every field comes from a key."""
    from olmo2_jax import config as config_lib

    m = config_lib.base_config().model
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields <= set(m.keys()), fields - set(m.keys())
    m.kernels, m.remat, m.n_heads = "xla", "full", 8
    cfg = ModelConfig.from_config(m)
    assert (cfg.kernels, cfg.remat, cfg.head_dim, cfg.dtype) == ("xla", "full", 256,
                                                                 jnp.bfloat16)
