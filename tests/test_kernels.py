"""Pallas flash attention in interpret mode against `reference_attention`, and AOT for TPU."""

import functools
import importlib.util
import math
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flash_attention, reference_attention

BF16_EPS = 2.0**-7  # bf16 spacing at 1: outputs are rounded to bf16 at the end


def _segments(key, B, T, layout):
    if layout is None:
        return None
    if layout == "random":  # documents of random lengths, boundaries anywhere
        starts = jax.random.bernoulli(key, 0.03, (B, T)).at[:, 0].set(True)
        return jnp.cumsum(starts, axis=1).astype(jnp.int32)
    # block edges and a one-token document: boundaries at 127|128, 129|130, T-1
    ids = np.zeros((B, T), np.int32)
    ids[:, 128:] += 1
    ids[:, 130:] += 1
    ids[:, T - 1:] += 1
    return jnp.asarray(ids)


def _max_rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# (B, T, N, K, H, segment layout, block): MHA, GQA 2, GQA 8 (MQA-like), head_dim 64/128,
# T a multiple of the block and not (200 -> padded to 256), documents crossing blocks.
CASES = [
    (1, 256, 2, 2, 128, None, 128),
    (2, 200, 4, 2, 64, "random", 128),
    (1, 256, 8, 1, 128, "edges", 128),
]


# GPU only: 16-row tiles, T=80 padded to 80, backward tiles halved from 128/64 to 16.
GPU_CASES = [(1, 80, 4, 2, 64, "random", 16)]
# TPU only: unequal query/key tiles (the causal clamping of the index maps), T=200 -> 256.
TPU_CASES = [(1, 200, 4, 2, 128, "random", (128, 256)), (1, 256, 2, 1, 64, "edges", (256, 128))]
CASES_F32 = [(1, 128, 2, 1, 64, "random", 128)]  # fp32 inputs (the model's parity dtype)


@pytest.mark.parametrize("backend,B,T,N,K,H,layout,block,dtype",
                         [(b, *c, "bfloat16") for b in ("tpu", "gpu") for c in CASES]
                         + [("gpu", *c, "bfloat16") for c in GPU_CASES]
                         + [("tpu", *c, "bfloat16") for c in TPU_CASES]
                         + [(b, *c, "float32") for b in ("tpu", "gpu") for c in CASES_F32])
def test_matches_reference_forward_and_grads(backend, B, T, N, K, H, layout, block, dtype):
    ks = jax.random.split(jax.random.key(B * T + N + K + H), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    d_out = jax.random.normal(ks[3], (B, T, N, H), dtype)
    seg = _segments(ks[4], B, T, layout)

    def ours(q, k, v):
        bq, bk = block if isinstance(block, tuple) else (block, block)
        return flash_attention(q, k, v, seg, backend=backend, block_q=bq, block_k=bk,
                               interpret=True)

    out, vjp = jax.vjp(ours, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg), q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    errs = {"out": _max_rel_err(out, ref)}
    for name, g, r in zip(("dq", "dk", "dv"), vjp(d_out), ref_vjp(d_out)):
        assert g.shape == r.shape and g.dtype == r.dtype
        errs[name] = _max_rel_err(g, r)
    print(f"{backend} {dtype} B{B} T{T} N{N} K{K} H{H} {layout}: max |err| / max |ref| = {errs}")
    # A few bf16 roundings of the largest value: a wrong mask, scale or GQA map is O(1).
    assert max(errs.values()) < 2 * BF16_EPS, errs
    if seg is not None:  # the document mask must matter for these inputs
        assert _max_rel_err(reference_attention(q, k, v), ref) > 0.1


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((1, 128, 4, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim=96"):
        flash_attention(q, q[:, :, :2], q[:, :, :2], backend="gpu", interpret=True)
    q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        flash_attention(q, q[:, :, :3], q[:, :, :3], backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="backend='cuda'"):
        flash_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, q, q, backend="tpu", block_q=64, interpret=True)
    with pytest.raises(ValueError, match="want one of bfloat16"):
        flash_attention(q, q.astype(jnp.float32), q, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, q, q, jnp.zeros((1, 64), jnp.int32), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="block_q=64"):
        flash_attention(q, q, q, backend="mgpu", block_q=64)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_kernels_compile_ahead_of_time_for_v5p():
    """Lowers and compiles fwd + dq + dk/dv through libtpu for a v5p topology, alone and as
    the model's sharded "auto" attention (subprocess: the TPU plugin stays out of this test
    process)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(root, "launch", "aot_attention.py"),
                           "--topology=v5p:2x2x1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count(": ok (") == 4, proc.stdout


def test_model_dispatch_runs_per_shard_under_the_mesh(monkeypatch):
    """config.model.attention='pallas' inside jit on a (data, fsdp, tensor) mesh: the kernel
    runs per (batch, heads) shard and matches XLA attention, gradients included."""
    from flax import linen as nn
    from jax.sharding import Mesh

    from olmo2_jax import ops, sharding

    # On the CPU the kernels only run interpreted; the model itself never interprets.
    monkeypatch.setattr(ops, "flash_attention",
                        functools.partial(flash_attention, backend="gpu", interpret=True))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), sharding.MESH_AXES)
    B, T, N, K, H = 2, 64, 8, 4, 64  # per tensor shard: 2 query heads, 1 kv head
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
    seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.05, (B, T)), axis=1)

    def loss(impl, q, k, v):
        out = ops.attention(q, k, v, seg, impl)
        return jnp.sum(out.astype(jnp.float32) * jnp.arange(H)), out

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        grad = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2), has_aux=True))
        (dq, dk, dv), out = grad(q, k, v)
        jaxpr = str(jax.make_jaxpr(functools.partial(loss, "pallas"))(q, k, v))
    (rdq, rdk, rdv), ref = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2),
                                    has_aux=True)(q, k, v)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    for a, b in ((out, ref), (dq, rdq), (dk, rdk), (dv, rdv)):
        assert _max_rel_err(a, b) < 2 * BF16_EPS

    # 4 kv heads cannot split over a tensor axis of 8: a clear error, not a shard_map one.
    mesh8 = Mesh(np.array(jax.devices()[:8]).reshape(1, 1, 8), sharding.MESH_AXES)
    with jax.set_mesh(mesh8), nn.logical_axis_rules(sharding.RULES):
        with pytest.raises(ValueError, match="n_kv_heads=4 does not split over the 8 devices"):
            ops.attention(q, k, v, seg, "pallas")


def test_auto_attention_and_config_checks(monkeypatch):
    from kernels import attention
    from olmo2_jax import config as config_lib
    from olmo2_jax import ops

    assert ops.attention_impl("auto") == "xla"  # CPU
    assert ops.attention_impl("pallas") == "pallas"
    # attention='pallas' on a GPU: the Hopper kernels on sm90, the Triton-lowered ones elsewhere
    monkeypatch.setattr(attention, "current_platform", lambda: "gpu")
    for arch, backend in (("9.0", "mgpu"), ("8.0", "gpu"), (None, "gpu")):
        monkeypatch.setattr(attention, "_local_gpu_arch", lambda arch=arch: arch)
        assert attention.default_backend() == backend
    c = runpy.run_path("configs/tiny.py")["get_config"]()  # head_dim 32
    c.model.attention = "pallas"
    with pytest.raises(config_lib.ConfigError, match="supports head_dim 64 or 128, not 32"):
        config_lib.validate(c, 8)
    c.model.head_dim = 64
    config_lib.validate(c, 8)


def _gpu_kernel_calls(f, *args, target="mosaic_gpu"):
    """Lowers f for CUDA on this CPU host (Pallas -> Mosaic GPU or Triton; for Mosaic GPU the
    shared-memory budget included) and counts the kernels with that custom-call target."""
    # a fresh function each call: jit's cache would return an earlier trace of f, one made
    # before a test changed the kernels' TUNING
    lowered = jax.jit(lambda *a: f(*a)).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text().count(f"stablehlo.custom_call @{target}")


def _mgpu_fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda *a: flash_attention(*a, backend="mgpu"), q, k, v)
    return out, vjp(out)


@pytest.mark.parametrize("fwd_overlap", [True, False])
@pytest.mark.parametrize("B,T,N,K,H", [(2, 1000, 8, 2, 128), (2, 512, 4, 4, 64),
                                       (1, 256, 8, 1, 128)])
def test_mosaic_gpu_kernels_lower_for_hopper(B, T, N, K, H, fwd_overlap, monkeypatch):
    """The Hopper kernels (forward, dq, dk/dv of the two-kernel backward) build and fit
    shared memory for GQA ratios 1/2/8, head_dim 64/128 and a padded T, with the forward's
    softmax pipelined under its PV matmul or not; their numbers are checked on the H200
    against cuDNN by bench/attention.py (docs/kernels.md): Mosaic GPU has no CPU interpreter
    for their wgmma accumulators."""
    from kernels import flash_attention_mgpu

    monkeypatch.setitem(flash_attention_mgpu.TUNING, "fwd_overlap", fwd_overlap)
    monkeypatch.setitem(flash_attention_mgpu.TUNING, "bwd", "two_kernel")
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    assert _gpu_kernel_calls(_mgpu_fwd_bwd, q, kv, kv) == 3


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("B,T,N,K,H", [(2, 1000, 8, 2, 128), (2, 512, 4, 4, 64)])
def test_mosaic_gpu_fused_backward_lowers_for_hopper(B, T, N, K, H, overlap, monkeypatch):
    """The one-kernel backward (dQ by TMA reduce-add into an fp32 buffer): forward + one
    backward kernel."""
    from kernels import flash_attention_mgpu

    monkeypatch.setitem(flash_attention_mgpu.TUNING, "bwd", "fused")
    monkeypatch.setitem(flash_attention_mgpu.TUNING, "fused_dq_overlap", overlap)
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    assert _gpu_kernel_calls(_mgpu_fwd_bwd, q, kv, kv) == 2


@pytest.mark.parametrize("backend,target", [("mgpu", "mosaic_gpu"),
                                            ("gpu", "__gpu$xla.gpu.triton")])
def test_kernel_forward_is_saved_under_the_models_remat_policy(backend, target):
    """With remat 'dots' the backward reuses the kernel's output and logsumexp (forward +
    backward kernels); saving nothing re-runs the forward (one kernel more)."""
    from kernels import flash_attention_mgpu
    from olmo2_jax import model

    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)

    def grad_with(policy):
        attn = jax.checkpoint(lambda q: flash_attention(q, q, q, backend=backend).sum(),
                              policy=policy)
        return jax.value_and_grad(attn)
    n = 2 if backend == "mgpu" and flash_attention_mgpu.TUNING["bwd"] == "fused" else 3
    assert _gpu_kernel_calls(grad_with(model._save_dots_and_attention), q, target=target) == n
    assert _gpu_kernel_calls(grad_with(jax.checkpoint_policies.nothing_saveable), q,
                             target=target) == n + 1


def test_mosaic_gpu_backend_names_the_fix_on_a_gpu_that_is_not_hopper(monkeypatch):
    from kernels import attention

    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    monkeypatch.setattr(attention, "_local_gpu_arch", lambda: "8.0")
    with pytest.raises(ValueError, match=r"needs a Hopper GPU \(sm90\), this one is sm80; use "
                                         "backend='gpu'"):
        jax.eval_shape(lambda q: flash_attention(q, q, q, backend="mgpu"), q)
    monkeypatch.setattr(attention, "_local_gpu_arch", lambda: "9.0")
    assert jax.eval_shape(lambda q: flash_attention(q, q, q, backend="mgpu"), q).shape == q.shape


def test_mosaic_gpu_backend_falls_back_where_it_does_not_apply():
    """Segment ids, fp32 and interpret mode go to the Triton-lowered kernels."""
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, 64, 2, 64), jnp.bfloat16)
    seg = jnp.cumsum(jax.random.bernoulli(ks[1], 0.05, (1, 64)), axis=1)
    out = flash_attention(q, q, q, seg, backend="mgpu", block_q=16, block_k=16, interpret=True)
    assert _max_rel_err(out, reference_attention(q, q, q, seg)) < 2 * BF16_EPS


def test_mosaic_gpu_kernels_carry_names_a_profile_can_class():
    """Pallas names a kernel after its body; ours are partials, which would all be
    "anonymous" and land in bench/kernel_profile's "other" class."""
    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    text = lowered(lambda q: jax.grad(lambda q: flash_attention(
        q, q, q, backend="mgpu").astype(jnp.float32).sum())(q), q)
    assert "flash_attention_fwd_kernel" in text and "anonymous" not in text


@pytest.mark.parametrize("x_shape,scale_shape,min_programs", [
    ((2, 64, 256), (256,), 264),        # one step per program
    ((4, 128, 2, 32), (2, 32), 4),      # QK-norm's two trailing axes; several steps per program
])
def test_rmsnorm_one_pass_backward_matches_autodiff(x_shape, scale_shape, min_programs,
                                                    monkeypatch):
    """kernels/rmsnorm_gpu (Pallas interpreter): the forward is XLA's; dx and dscale match
    autodiff of the same forward, including the partial dscale sums carried across a
    program's steps."""
    from kernels import rmsnorm_gpu

    monkeypatch.setitem(rmsnorm_gpu.TUNING, "min_programs", min_programs)
    M = math.prod(x_shape[:-len(scale_shape)])
    assert (rmsnorm_gpu._steps(M // rmsnorm_gpu.TUNING["rows"]) > 1) == (min_programs == 4)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], x_shape, jnp.bfloat16) * 3
    scale = 1 + 0.1 * jax.random.normal(k[1], scale_shape, jnp.float32)
    dy = jax.random.normal(k[2], x_shape, jnp.bfloat16)
    y_ref, vjp_ref = jax.vjp(lambda x, s: rmsnorm_gpu.reference(x, s, 1e-6, jnp.bfloat16), x, scale)
    y, vjp = jax.vjp(lambda x, s: rmsnorm_gpu.rms_norm(x, s, 1e-6, jnp.bfloat16, interpret=True),
                     x, scale)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, ref in zip(vjp(dy), vjp_ref(dy)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert np.max(np.abs(got - ref)) <= 8e-3 * np.max(np.abs(ref))


def test_rmsnorm_kernel_refuses_what_it_cannot_run_and_lowers_for_cuda():
    from kernels import rmsnorm_gpu

    x = jnp.zeros((8, 96), jnp.bfloat16)
    assert not rmsnorm_gpu.supported(x.shape, (96,))
    with pytest.raises(ValueError, match="feature width must be a power of two.*kernels='xla'"):
        rmsnorm_gpu.rms_norm(x, jnp.ones((96,)), 1e-6)
    with pytest.raises(ValueError, match="scale .* must match"):
        rmsnorm_gpu.rms_norm(x, jnp.ones((64,)), 1e-6)
    grad = jax.jit(jax.grad(lambda x, s: jnp.sum(rmsnorm_gpu.rms_norm(x, s, 1e-6).astype(
        jnp.float32)), argnums=(0, 1)))
    text = grad.trace(jax.ShapeDtypeStruct((24 * 4096, 2048), jnp.bfloat16),
                      jax.ShapeDtypeStruct((2048,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1 and "rmsnorm_bwd" in text


@pytest.mark.parametrize("B,T,N,min_programs", [(2, 16, 4, 264), (1, 64, 2, 2)])
def test_rmsnorm_rope_one_pass_backward_matches_fp32_autodiff(B, T, N, min_programs,
                                                              monkeypatch):
    """kernels/rmsnorm_gpu.rms_norm_rope (Pallas interpreter): the forward is bit for bit the
    model's QK-norm then RoPE; dx and dscale match fp32 autodiff of that forward (closer than
    XLA's bf16 autodiff gets), with positions that are not 0..T-1 and, in the second case,
    several steps per program (partial dscale sums carried across steps)."""
    from kernels import rmsnorm_gpu as R

    monkeypatch.setitem(R.ROPE_TUNING, "min_programs", min_programs)
    H, theta, eps = 32, 5e5, 1e-6
    assert (R._steps(B * T // R.ROPE_TUNING["rows"], R.ROPE_TUNING) > 1) == (min_programs == 2)
    k = jax.random.split(jax.random.key(2), 4)
    x = (3 * jax.random.normal(k[0], (B, T, N, H))).astype(jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(k[1], (N, H))
    pos = jax.random.randint(k[2], (B, T), 0, 4096)
    dy = jax.random.normal(k[3], x.shape).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, s: R.rms_norm_rope(x, s, pos, theta, eps, jnp.bfloat16,
                                                  interpret=True), x, scale)
    y_ref, vjp_bf16 = jax.vjp(lambda x, s: R.apply_rope(R.reference(x, s, eps, jnp.bfloat16),
                                                        pos, theta), x, scale)
    _, vjp_f32 = jax.vjp(lambda x, s: R.apply_rope(R.reference(x, s, eps, jnp.float32), pos,
                                                   theta), x.astype(jnp.float32), scale)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, bf16, ref in zip(vjp(dy), vjp_bf16(dy), vjp_f32(dy.astype(jnp.float32))):
        got, bf16, ref = (np.asarray(a, np.float32) for a in (got, bf16, ref))
        assert got.shape == ref.shape
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err <= 4e-3 and err <= np.max(np.abs(bf16 - ref)) / np.max(np.abs(ref))
    with pytest.raises(ValueError, match="needs scale .* and positions"):
        R.rms_norm_rope(x, scale[:1], pos, theta, eps)
    assert not R.rope_supported((2, 3, 4, 32)) and not R.rope_supported((2, 8, 3, 32))


def test_swiglu_one_pass_backward_matches_fp32_autodiff_and_lowers_for_cuda():
    """kernels/swiglu_gpu (Pallas interpreter, several tiles each way): the forward is bit for
    bit XLA's silu(gate) * up; dgate and dup match fp32 autodiff to bf16 rounding (XLA's
    bf16 autodiff is further off); the backward is one Triton call for CUDA."""
    from kernels import swiglu_gpu as S

    k = jax.random.split(jax.random.key(4), 3)
    shape = (2, 16, 3 * 256)  # the tile's width: gcd(768, 1024) = 256, three per row
    g = (3 * jax.random.normal(k[0], shape)).astype(jnp.bfloat16)
    u = jax.random.normal(k[1], shape).astype(jnp.bfloat16)
    dh = jax.random.normal(k[2], shape).astype(jnp.bfloat16)
    h, vjp = jax.vjp(lambda g, u: S.swiglu(g, u, interpret=True), g, u)
    h_ref, vjp_bf16 = jax.vjp(S.reference, g, u)
    _, vjp_f32 = jax.vjp(S.reference, g.astype(jnp.float32), u.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))
    for got, bf16, ref in zip(vjp(dh), vjp_bf16(dh), vjp_f32(dh.astype(jnp.float32))):
        assert got.dtype == jnp.bfloat16
        got, bf16, ref = (np.asarray(a, np.float32) for a in (got, bf16, ref))
        np.testing.assert_allclose(got, ref, rtol=8e-3, atol=8e-3 * np.max(np.abs(ref)))
        assert np.mean(np.abs(got - ref)) < np.mean(np.abs(bf16 - ref))
    assert not S.supported((2, 16, 96)) and not S.supported((3, 1024))
    with pytest.raises(ValueError, match="must split into tiles.*kernels='xla'"):
        jax.grad(lambda g: S.swiglu(g, g).astype(jnp.float32).sum())(jnp.ones((2, 96)))
    grad = jax.jit(jax.grad(lambda g, u: S.swiglu(g, u).astype(jnp.float32).sum(), (0, 1)))
    text = grad.trace(*[jax.ShapeDtypeStruct((4096, 8192), jnp.bfloat16)] * 2).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1 and "swiglu_bwd" in text


def test_xent_passes_match_reference_over_several_tiles(monkeypatch):
    """kernels/xent_gpu (Pallas interpreter), with tiles small enough that each program walks
    several rows and vocabulary tiles: the logsumexp equals jax.nn.logsumexp (maxima early,
    late and huge, rows with -inf entries, a row of only -inf) and the softmax gradient its
    reference, the target's -mask included; both lower to one Triton call each for CUDA."""
    from kernels import xent_gpu

    monkeypatch.setitem(xent_gpu.TUNING, "lse", {"rows": 4, "cols": 128, "num_warps": 4})
    monkeypatch.setitem(xent_gpu.TUNING, "grad", {"rows": 2, "cols": 256, "num_warps": 4})
    R, V = 16, 512
    k = jax.random.split(jax.random.key(3), 4)
    x = 4 * jax.random.normal(k[0], (R, V), jnp.float32)
    x = x.at[0].set(jnp.arange(V, dtype=jnp.float32)).at[1].set(-jnp.arange(V, dtype=jnp.float32))
    x = x.at[2].multiply(1e4).at[3, :300].set(-jnp.inf).at[4].set(-jnp.inf)
    lse = xent_gpu.logsumexp(x, interpret=True)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(x, axis=-1), rtol=1e-6, atol=1e-5)
    assert np.isneginf(lse[4])

    xb = x.at[4].set(0.0).astype(jnp.bfloat16)
    lse = xent_gpu.reference_logsumexp(xb)
    targets = jax.random.randint(k[1], (R,), 0, V).at[0].set(V - 1)
    mask = (jax.random.uniform(k[2], (R,)) > 0.3).astype(jnp.float32).at[0].set(1.0)
    coef = (1 + 0.1 * jax.random.uniform(k[3], (R,))) * mask
    g = xent_gpu.softmax_grad(xb, lse, coef, targets, mask, jnp.bfloat16, interpret=True)
    ref = xent_gpu.reference_softmax_grad(xb, lse, coef, targets, mask, jnp.bfloat16)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(ref, np.float32))
    # each row sums to coef - mask: the softmax sums to 1 and the target takes mask off
    np.testing.assert_allclose(np.sum(np.asarray(g, np.float32), axis=1), coef - mask, atol=2e-2)

    assert not xent_gpu.supported((R, 500)) and not xent_gpu.supported((R + 1, V))
    both = jax.jit(lambda x, t, m: xent_gpu.softmax_grad(x, xent_gpu.logsumexp(x), m, t, m,
                                                         jnp.bfloat16))
    text = both.trace(jax.ShapeDtypeStruct((8192, 100352), jnp.bfloat16),
                      jax.ShapeDtypeStruct((8192,), jnp.int32),
                      jax.ShapeDtypeStruct((8192,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 2
    assert "xent_logsumexp" in text and "xent_softmax_grad" in text
