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
from olmo2_jax.model import ModelConfig, Transformer, apply_rope

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
    for policy in ("dots", "dots_plus", "full"):
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
    y = apply_rope(x, pos, 10_000.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-7)  # position 0: identity


def test_mgpu_matmul_model_matches_xla_and_compiles_each_gemm_once(monkeypatch, xla_gemms):
    """model.matmul='mgpu': the same logits and gradients as XLA's einsums (XLA standing in
    for the kernel, whose numbers bench/gemm.py checks on the H200); for CUDA the step has
    21 GEMM calls per layer (3 per weight), none re-run by remat "dots", and one compiled
    kernel per distinct shape and layout (and summing epilogue) however many layers."""
    from bench.lower_cuda import kernel_counts
    from olmo2_jax import model as model_lib

    cfg = ModelConfig(vocab_size=512, padded_vocab_size=512, d_model=256, n_layers=2, n_heads=2,
                      n_kv_heads=2, head_dim=128, mlp_hidden=512, scan_layers=False,
                      attention="xla", norm_impl="xla", rope_impl="xla", mlp_impl="xla")
    mgpu = dataclasses.replace(cfg, matmul="mgpu")
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 256), 0, cfg.vocab_size)
    _, params = init(cfg)
    with pytest.raises(ValueError, match="matmul='mgpu' needs a Hopper GPU"):
        Transformer(mgpu).apply({"params": params}, tokens)

    monkeypatch.setattr(model_lib, "current_platform", lambda: "gpu")
    lowered = jax.jit(jax.grad(lambda p: Transformer(mgpu).apply(p, tokens).mean())).trace(
        {"params": params}).lower(lowering_platforms=("cuda",)).as_text()
    counts = kernel_counts(lowered)
    assert counts["matmul_calls"] == 2 * 21
    assert counts["distinct_kernels"] == 11

    xla_gemms()
    _assert_same_loss_and_grads(mgpu, cfg, params, tokens)


def test_pallas_norm_model_matches_xla(monkeypatch):
    """model.norm_impl='pallas': on the CPU it names the fix; with the kernel in Pallas'
    interpreter the loss and every gradient match XLA's norms, under remat "dots", on one
    device and per shard of rows on a data x fsdp mesh. Where the mesh splits the heads,
    "auto" keeps QK-norm on XLA and 'pallas' says why."""
    from kernels import rmsnorm_gpu
    from olmo2_jax import model as model_lib

    cfg = ModelConfig(vocab_size=512, padded_vocab_size=512, d_model=256, n_layers=2, n_heads=2,
                      n_kv_heads=2, head_dim=128, mlp_hidden=512, scan_layers=False,
                      attention="xla", remat="dots", norm_impl="xla", rope_impl="xla",
                      mlp_impl="xla")
    ours = dataclasses.replace(cfg, norm_impl="pallas")
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 64), 0, cfg.vocab_size)
    _, params = init(cfg)
    with pytest.raises(ValueError, match="norm_impl='pallas' needs a GPU.*use norm_impl='auto'"):
        Transformer(ours).apply({"params": params}, tokens)
    np.testing.assert_array_equal(
        Transformer(dataclasses.replace(cfg, norm_impl="auto")).apply({"params": params}, tokens),
        Transformer(cfg).apply({"params": params}, tokens))

    monkeypatch.setattr(model_lib, "current_platform", lambda: "gpu")
    monkeypatch.setattr(rmsnorm_gpu, "rms_norm",
                        functools.partial(rmsnorm_gpu.rms_norm, interpret=True))

    def kernels(c):  # 4 norms per layer and the final one, each backward one kernel
        grad = jax.grad(lambda p: _loss(c, p, tokens))
        return str(jax.make_jaxpr(grad)(params)).count("pallas_call")

    auto = dataclasses.replace(cfg, norm_impl="auto")
    assert kernels(ours) == kernels(auto) == 9 and kernels(cfg) == 0
    _assert_same_loss_and_grads(ours, cfg, params, tokens)

    def mesh(*shape):
        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)

    tokens = tokens.reshape(8, 16)
    with jax.set_mesh(mesh(2, 4, 1)), nn.logical_axis_rules(sharding.RULES):
        assert "shard_map" in str(jax.make_jaxpr(jax.grad(lambda p: _loss(ours, p, tokens)))(
            params))
        _assert_same_loss_and_grads(ours, cfg, params, tokens)
    with jax.set_mesh(mesh(1, 4, 2)), nn.logical_axis_rules(sharding.RULES):
        assert kernels(auto) == 5  # the post-norms and the final norm; QK-norm on XLA
        with pytest.raises(ValueError, match="q_norm cannot run per shard, its features are "
                                             "split over mesh axes \\('tensor',\\)"):
            kernels(ours)


def _loss(cfg, params, tokens):
    return jnp.mean(Transformer(cfg).apply({"params": params}, tokens).astype(jnp.float32) ** 2)


def _assert_same_loss_and_grads(cfg, cfg_ref, params, tokens):
    """A kernel option against XLA's path: the loss, and every gradient to 2% of its max."""
    loss = jax.jit(_loss, static_argnums=0)  # jitted: eager op-by-op runs are slow on the CPU
    np.testing.assert_allclose(loss(cfg, params, tokens), loss(cfg_ref, params, tokens),
                               rtol=1e-3)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    g, g_ref = (grad(c, params, tokens) for c in (cfg, cfg_ref))
    for path, ref in jax.tree_util.tree_leaves_with_path(g_ref):
        got = np.asarray(functools.reduce(lambda t, k: t[k.key], path, g), np.float32)
        ref = np.asarray(ref, np.float32)
        assert np.max(np.abs(got - ref)) <= 0.02 * np.max(np.abs(ref)) + 1e-8, path


def test_pallas_norm_lowers_for_cuda_per_shard_on_a_mesh(monkeypatch):
    """On a data x fsdp mesh the defaults ('auto', on a GPU) lower each norm's backward, QK-norm
    + RoPE's and SwiGLU's as one Triton kernel each inside a manual (shard_map) computation:
    per layer 2 norms, 2 QK-norms, 1 SwiGLU; plus the final norm."""
    import re

    from olmo2_jax import model as model_lib

    monkeypatch.setattr(model_lib, "current_platform", lambda: "gpu")
    cfg = ModelConfig(vocab_size=512, padded_vocab_size=512, d_model=256, n_layers=2, n_heads=2,
                      n_kv_heads=2, head_dim=128, mlp_hidden=512, scan_layers=False,
                      attention="xla")
    m = Transformer(cfg)
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1), sharding.MESH_AXES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        text = jax.jit(jax.grad(lambda p, t: m.apply(p, t).astype(jnp.float32).mean())).trace(
            params, jax.ShapeDtypeStruct((8, 64), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 2 * 5 + 1
    assert "rmsnorm_rope_bwd" in text and "swiglu_bwd" in text
    assert "sdy.manual_computation" in text or 'mhlo.sharding = "{manual}"' in text


def test_fused_rope_and_swiglu_backwards_match_xla(monkeypatch):
    """model.rope_impl / mlp_impl 'pallas' (kernels in Pallas' interpreter): the loss and every
    gradient match XLA's path under remat "dots" (the kernels' residuals are the saved
    GEMM outputs), on one device and per shard on a data x fsdp mesh; where the mesh splits
    the heads, rope 'pallas' names the fix and the MLP still runs per shard. mlp_impl
    'pallas_grouped' (stacked cotangent, one GEMM per gate/up gradient) likewise, the
    tensor-split MLP included. 'auto' (the GPU default) takes both kernels, XLA's paths where
    the tokens are no whole tiles, and the MLP's alone where the heads are split. Both lower
    for CUDA: one Triton call for each of QK-norm+RoPE (x2) and SwiGLU per layer."""
    import re

    from kernels import rmsnorm_gpu, swiglu_gpu
    from olmo2_jax import model as model_lib

    cfg = ModelConfig(vocab_size=512, padded_vocab_size=512, d_model=256, n_layers=2, n_heads=2,
                      n_kv_heads=2, head_dim=128, mlp_hidden=512, scan_layers=False,
                      attention="xla", remat="dots", norm_impl="xla", rope_impl="xla",
                      mlp_impl="xla")
    ours = dataclasses.replace(cfg, rope_impl="pallas", mlp_impl="pallas")
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 64), 0, cfg.vocab_size)
    _, params = init(cfg)
    for key, value in (("rope_impl", "pallas"), ("mlp_impl", "pallas"),
                       ("mlp_impl", "pallas_grouped")):
        with pytest.raises(ValueError, match=f"{key}='{value}' needs a GPU.*use {key}='auto'"):
            Transformer(dataclasses.replace(cfg, **{key: value})).apply({"params": params},
                                                                       tokens)

    monkeypatch.setattr(model_lib, "current_platform", lambda: "gpu")
    m = Transformer(ours)  # init's one-token trace takes XLA's path, not the kernels' tiles
    abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    text = jax.jit(jax.grad(lambda p, t: m.apply(p, t).astype(jnp.float32).mean())).trace(
        abstract, jax.ShapeDtypeStruct((8, 64), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 2 * 3
    assert "rmsnorm_rope_bwd" in text and "swiglu_bwd" in text
    grouped = dataclasses.replace(cfg, mlp_impl="pallas_grouped")
    text = jax.jit(jax.grad(lambda p, t: Transformer(grouped).apply(p, t).astype(
        jnp.float32).mean())).trace(abstract, jax.ShapeDtypeStruct((8, 64), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("swiglu_bwd_stacked") >= 2 and "rmsnorm_rope_bwd" not in text

    monkeypatch.setattr(rmsnorm_gpu, "rms_norm_rope",
                        functools.partial(rmsnorm_gpu.rms_norm_rope, interpret=True))
    monkeypatch.setattr(swiglu_gpu, "swiglu", functools.partial(swiglu_gpu.swiglu, interpret=True))
    grad = jax.grad(lambda p: _loss(ours, p, tokens))

    def kernels(c, t):
        return str(jax.make_jaxpr(jax.grad(lambda p: _loss(c, p, t)))(params)).count("pallas_call")

    auto = dataclasses.replace(cfg, rope_impl="auto", mlp_impl="auto")  # the GPU default
    assert kernels(ours, tokens) == kernels(auto, tokens) == 2 * 3
    assert kernels(auto, tokens[:1, :3]) == 0  # 3 tokens are no whole tiles: XLA's paths
    _assert_same_loss_and_grads(ours, cfg, params, tokens)
    monkeypatch.setattr(swiglu_gpu, "gated", functools.partial(swiglu_gpu.gated, interpret=True))
    _assert_same_loss_and_grads(grouped, cfg, params, tokens)

    def mesh(*shape):
        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES)

    tokens = tokens.reshape(8, 16)
    with jax.set_mesh(mesh(2, 4, 1)), nn.logical_axis_rules(sharding.RULES):
        _assert_same_loss_and_grads(ours, cfg, params, tokens)
    with jax.set_mesh(mesh(1, 4, 2)), nn.logical_axis_rules(sharding.RULES):
        with pytest.raises(ValueError, match="rope_impl='pallas': q_norm cannot run per shard, "
                                             "its features are split"):
            jax.make_jaxpr(grad)(params)
        assert kernels(auto, tokens) == 2  # heads split: QK-norm+RoPE on XLA, SwiGLU per shard
        mlp_only = dataclasses.replace(cfg, mlp_impl="pallas")
        _assert_same_loss_and_grads(mlp_only, cfg, params, tokens)
        _assert_same_loss_and_grads(grouped, cfg, params, tokens)


@pytest.mark.parametrize("spec,x_shape,w_shape,contract", [
    ("BTD,DF->BTF", (2, 32, 64), (64, 96), 1),
    ("BTD,DNH->BTNH", (2, 32, 64), (64, 4, 16), 1),
    ("BTNH,NHD->BTD", (2, 32, 4, 16), (4, 16, 64), 2),
])
def test_fp32_weight_grads_keep_the_bits_bf16_autodiff_rounds(spec, x_shape, w_shape, contract):
    """weight_grad_dtype='float32': the same forward and input gradient as autodiff of the
    bf16 einsum, bit for bit, and a weight gradient equal to the fp32 product of the bf16
    operands, where autodiff's is that product rounded to bf16."""
    from olmo2_jax.model import dense

    kx, kw, ky = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jax.random.normal(kx, x_shape, jnp.bfloat16)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    out_shape = x_shape[:-contract] + w_shape[contract:]
    dy = jax.random.normal(ky, out_shape, jnp.bfloat16)
    cfgs = {d: dataclasses.replace(TINY, dtype=jnp.bfloat16, weight_grad_dtype=d)
            for d in ("float32", "bfloat16")}
    (y32, vjp32), (y16, vjp16) = (
        jax.vjp(lambda x, w, c=c: dense(spec, x, w, c, contract=contract), x, w)
        for c in cfgs.values())
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


def test_fp32_weight_grads_model_matches_autodiff_and_remat_saves_the_gemms():
    """The bf16 model with fp32 weight gradients: the loss of the autodiff path and its
    gradients to bf16 accuracy, on one device and on a data x fsdp x tensor mesh; remat
    'dots' keeps the custom-VJP GEMM outputs, so the backward re-runs no weight GEMM."""
    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, weight_grad_dtype="bfloat16",
                              remat="dots", attention="xla", norm_impl="xla")
    ours = dataclasses.replace(cfg, weight_grad_dtype="float32")
    tokens = jax.random.randint(jax.random.PRNGKey(7), (8, 16), 0, cfg.vocab_size)
    _, params = init(cfg)
    np.testing.assert_array_equal(_loss(ours, params, tokens), _loss(cfg, params, tokens))
    _assert_same_loss_and_grads(ours, cfg, params, tokens)

    def gemms(c):
        hlo = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0).lower(
            c, params, tokens).compile().as_text()
        return hlo.count(" dot(")

    def rerun(c):  # GEMMs the backward re-runs: XLA attention's two batched dots only
        return gemms(c) - gemms(dataclasses.replace(c, remat="none"))

    assert rerun(ours) == rerun(cfg) == 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _assert_same_loss_and_grads(ours, cfg, params, tokens)


def _residual_sums(cfg, params, tokens):
    """The backward's sums of [B, T, d_model] arrays: (primitive, is operand 0 a GEMM, is
    operand 1 one) for each add in the gradient's jaxpr, custom-VJP backwards inlined."""
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: _loss(cfg, p, tokens)))(params).jaxpr
    made_by = {v: e.primitive.name for e in jaxpr.eqns for v in e.outvars}
    shape = (*tokens.shape, cfg.d_model)
    return [(e.primitive.name, *(made_by.get(v) == "dot_general" for v in e.invars))
            for e in jaxpr.eqns
            if e.primitive.name in ("add", "add_any") and e.outvars[0].aval.shape == shape
            and any(made_by.get(v) == "dot_general" for v in e.invars)]


@pytest.mark.parametrize("weight_grad_dtype", ["float32", "bfloat16"])
def test_gemm_input_grad_sums_match_autodiff_bit_for_bit(weight_grad_dtype, monkeypatch):
    """input_grad_sum='gemm' (fork_dense_group): the residual's cotangent is summed in the
    q/k/v and gate/up groups' custom VJP, each step `GEMM + running sum` (a form XLA's GPU
    rewriter folds into the GEMM as its C), where autodiff adds `running sum + GEMM` through
    add_any. The same loss and gradients bit for bit on the CPU (same sums, same order; bf16
    weight gradients to 1 ulp), on one device and on a data x fsdp mesh; 'auto' resolves to it
    on GPUs only."""
    from olmo2_jax import model as model_lib

    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, remat="none", scan_layers=False,
                              attention="xla", norm_impl="xla", rope_impl="xla", mlp_impl="xla",
                              weight_grad_dtype=weight_grad_dtype, input_grad_sum="autodiff")
    ours = dataclasses.replace(cfg, input_grad_sum="gemm")
    tokens = jax.random.randint(jax.random.PRNGKey(8), (8, 16), 0, cfg.vocab_size)
    _, params = init(cfg)

    sums = {c.input_grad_sum: _residual_sums(c, params, tokens) for c in (cfg, ours)}
    per_layer = 3 + 2  # q/k/v's and gate/up's input gradients
    assert len(sums["autodiff"]) == len(sums["gemm"]) == per_layer * cfg.n_layers
    assert all(s == ("add", True, False) for s in sums["gemm"])
    # autodiff: the first of each group's sums adds a GEMM to the skip, the rest put the sum first
    assert sum(s == ("add_any", False, True) for s in sums["autodiff"]) == per_layer * cfg.n_layers

    grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
    for mesh_shape in (None, (2, 4, 1)):
        if mesh_shape is None:
            (l_ref, g_ref), (l, g) = grad(cfg, params, tokens), grad(ours, params, tokens)
        else:
            mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(mesh_shape),
                                     sharding.MESH_AXES)
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
                (l_ref, g_ref), (l, g) = grad(cfg, params, tokens), grad(ours, params, tokens)
        np.testing.assert_array_equal(l, l_ref)
        if weight_grad_dtype == "float32":
            jax.tree.map(np.testing.assert_array_equal, g, g_ref)
        else:  # bf16 weight-gradient GEMMs: a dot of another dimension order may round 1 ulp apart
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-9),
                         g, g_ref)

    auto = dataclasses.replace(cfg, input_grad_sum="auto")
    assert model_lib.input_grad_sum(auto) == "autodiff"
    monkeypatch.setattr(model_lib, "current_platform", lambda: "gpu")
    assert model_lib.input_grad_sum(auto) == "gemm"
