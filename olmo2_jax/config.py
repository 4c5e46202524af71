"""Config defaults, validation with clear errors, and parameter/FLOP accounting.

Every `configs/*.py` starts from `base_config()` and changes what differs; the
four OLMo 2 sizes are data (`model_preset`), not code paths.
"""

from __future__ import annotations

import math

import ml_collections

# Released OLMo 2 shapes (olmo2_reference.md). Everything not listed is shared.
MODEL_PRESETS = {
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden=8192),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=11008),
    "13b": dict(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, mlp_hidden=13824),
    "32b": dict(d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8, mlp_hidden=27648),
}

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
KERNELS = ("auto", "xla")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config: the OLMo 2 architecture and stage-1 recipe."""
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 100_278  # real tokens of the dolma2 tokenizer
    m.padded_vocab_size = 100_352  # embedding / LM head rows (multiple of 128)
    m.d_model = 2048
    m.n_layers = 16
    m.n_heads = 16
    m.n_kv_heads = 16
    m.head_dim = 0  # 0 = d_model // n_heads
    m.mlp_hidden = 8192
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-6
    m.max_seq_len = 4096
    m.init_std = 0.02
    m.dtype = "bfloat16"  # activation / matmul dtype
    m.param_dtype = "float32"  # master weights
    m.scan_layers = True
    m.remat = "dots"  # one of REMAT_POLICIES: none, full, or dots (weight GEMMs + attention out)
    # one of ATTENTION_IMPLS; auto = pallas on TPU, cudnn on GPU, xla on CPU. pallas on a GPU:
    # the Hopper (Mosaic GPU) kernels on sm90 for bf16 without document masking, else Triton
    m.attention = "auto"
    # "auto": the one-pass Pallas backwards (RMSNorm, QK-norm + RoPE, SwiGLU, the fused loss's
    # passes) on GPUs wherever they can run, XLA elsewhere; "xla": XLA everywhere (ops.py)
    m.kernels = "auto"

    c.data = d = ml_collections.ConfigDict()
    d.paths = ""  # comma-separated raw uint32 token files (globs ok); "" = embedded corpus
    d.seq_len = 4096
    d.seed = 0
    d.num_workers = 0  # grain worker processes; 0 = in-process threads
    d.corpus_vocab_size = 4096  # sentencepiece vocab of the embedded default corpus
    d.tokenizer = "dolma2"  # spec (data/tokenizer.py): {TOKENIZER} in mixes, EOS id, vocab check
    d.mix = ""  # mix file of `label,path` lines (configs/mixes/); used instead of paths
    d.mix_base = ""  # folder or gs://bucket/prefix that relative mix paths are under
    d.weights = ""  # "label=0.7,other=0.3": fixed shares per source; "" = natural token counts
    d.repeats = ""  # "label=2,...": times per epoch in the natural mix (Dolmino up-sampling)
    d.document_masking = False  # attention stays within documents (segment ids + positions)
    d.ngram_max_period = 13  # repeated n-gram loss mask: spans of 1..this many tokens
    d.ngram_min_repeats = 32  # ... repeated this many times in a row; 0 = off

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.global_batch_size = 512  # sequences per optimiser step
    t.micro_batch_size = 0  # sequences per forward/backward; 0 = global (no accumulation)
    t.z_loss_weight = 1e-5
    t.loss_chunks = 8  # fused LM head + loss over this many sequence chunks; 0 = full logits
    # Fused loss only: dtype the LM-head matmul writes its logits in (the loss math is fp32
    # either way). "bfloat16" halves the loss's memory traffic and rounds the logits as
    # torch autocast does (the official and transformers steps); "float32" is exact.
    t.loss_logits_dtype = "float32"
    t.seed = 0
    t.log_every = 10
    t.peak_flops_per_device = 0.0  # 0 = from the device kind (None on CPU)
    # A checkpoint (e.g. from `convert from_hf`) whose params start a new run; the optimiser
    # state starts fresh. Ignored when the workdir already holds checkpoints (resume).
    t.init_from = ""
    # Step guard (guard.py): non-finite steps are always skipped; the spike rule is optional.
    t.skip_sigma = 0.0  # skip a step whose loss or grad norm is > this many sigma above the
    t.skip_window = 128  # ... rolling window of accepted steps (OLMo 2 32B: 6 sigma); 0 = off
    t.rollback_after = 0  # this many skipped steps in a row -> reload the last checkpoint; 0 = off
    t.rollback_skip_batches = 0  # ... and skip this many batches past the bad ones

    c.optim = o = ml_collections.ConfigDict()
    o.schedule = "cosine"  # one of SCHEDULES
    o.lr = 4e-4
    o.warmup_steps = 2000
    o.decay_steps = 0  # schedule horizon; 0 = train.steps
    o.final_lr_ratio = 0.1  # cosine ends at lr * ratio
    o.wsd_decay_fraction = 0.1  # WSD: last fraction of the horizon decays linearly to 0
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 1000
    k.every_seconds = 0.0  # also save when this long has passed since the last save; 0 = off
    k.directory = ""  # "" = <workdir>/checkpoints; or gs://bucket/path (metrics stay in workdir)
    k.keep = 3
    k.async_save = True

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = 1
    ms.fsdp = -1  # -1 = the remaining devices
    ms.tensor = 1
    return c


def apply_preset(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Sets the released shape `name` (1b/7b/13b/32b) on `c.model`."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    c.model.update(MODEL_PRESETS[name])
    return c


def head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


def mesh_shape(c, num_devices: int) -> dict[str, int]:
    """Resolves the -1 entry of config.mesh against the device count."""
    shape = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one of config.mesh.{{data,fsdp,tensor}} may be -1, got {shape}")
    for k, v in shape.items():
        if v == 0 or v < -1:
            raise ConfigError(f"config.mesh.{k}={v}: use a positive size or -1 for the rest")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh {shape}: the fixed axes ({fixed} devices) do not divide the "
                f"{num_devices} available devices")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(
            f"config.mesh {shape} uses {math.prod(shape.values())} devices but "
            f"{num_devices} are available; set one axis to -1 or match the count")
    return shape


def micro_batch_size(c) -> int:
    return c.train.micro_batch_size or c.train.global_batch_size


def validate(c, num_devices: int | None = None) -> None:
    """Raises ConfigError naming the key and the fix; cheap, runs before any compile."""
    m, t, o = c.model, c.train, c.optim

    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "vocab_size",
                "padded_vocab_size", "max_seq_len"):
        need(m[key] > 0, f"config.model.{key}={m[key]} must be positive")
    need(m.d_model % m.n_heads == 0 or m.head_dim > 0,
         f"config.model.n_heads={m.n_heads} does not divide d_model={m.d_model}; "
         "pick a divisor or set config.model.head_dim")
    need(m.n_heads % m.n_kv_heads == 0,
         f"config.model.n_kv_heads={m.n_kv_heads} does not divide n_heads={m.n_heads} (GQA groups "
         "must be whole)")
    need(m.padded_vocab_size >= m.vocab_size,
         f"config.model.padded_vocab_size={m.padded_vocab_size} is smaller than "
         f"vocab_size={m.vocab_size}")
    need(m.remat in REMAT_POLICIES, f"config.model.remat={m.remat!r}: choose one of {REMAT_POLICIES}")
    need(m.attention in ATTENTION_IMPLS,
         f"config.model.attention={m.attention!r}: choose one of {ATTENTION_IMPLS}")
    need(m.attention != "pallas" or head_dim(m) in (64, 128),
         f"config.model.attention='pallas' supports head_dim 64 or 128, not {head_dim(m)}; "
         "use attention='auto' or 'xla'")
    need(m.attention != "pallas" or m.dtype in ("bfloat16", "float32"),
         f"config.model.attention='pallas' takes bfloat16 or float32, not dtype={m.dtype!r}")
    need(m.kernels in KERNELS, f"config.model.kernels={m.kernels!r}: choose one of {KERNELS}")
    for key in ("dtype", "param_dtype"):
        need(m[key] in DTYPES, f"config.model.{key}={m[key]!r}: choose one of {DTYPES}")
    need(m.rope_theta > 0 and m.norm_eps > 0, "config.model.rope_theta and norm_eps must be > 0")

    need(0 < c.data.seq_len <= m.max_seq_len,
         f"config.data.seq_len={c.data.seq_len} must be in 1..model.max_seq_len={m.max_seq_len}")
    d = c.data
    need(not (d.mix and d.paths), "set config.data.mix or config.data.paths, not both")
    need(not (d.weights and d.repeats),
         "config.data.weights (fixed shares) and config.data.repeats (natural shares, "
         "up-sampled) exclude each other; set one")
    need(d.mix or not (d.weights or d.repeats),
         "config.data.weights / repeats name mix sources: set config.data.mix too")
    need(d.ngram_min_repeats == 0 or (d.ngram_min_repeats >= 2 and d.ngram_max_period >= 1),
         f"config.data.ngram_min_repeats={d.ngram_min_repeats} must be 0 (off) or >= 2 and "
         f"ngram_max_period={d.ngram_max_period} >= 1")
    need(t.steps > 0, f"config.train.steps={t.steps} must be positive")
    need(t.global_batch_size > 0, f"config.train.global_batch_size={t.global_batch_size} must be > 0")
    mb = micro_batch_size(c)
    need(t.global_batch_size % mb == 0,
         f"config.train.micro_batch_size={mb} does not divide global_batch_size="
         f"{t.global_batch_size}")
    need(t.log_every > 0, f"config.train.log_every={t.log_every} must be positive")
    need(t.z_loss_weight >= 0, "config.train.z_loss_weight must be >= 0")
    need(t.loss_chunks >= 0 and (t.loss_chunks == 0 or c.data.seq_len % t.loss_chunks == 0),
         f"config.train.loss_chunks={t.loss_chunks} must be 0 or divide data.seq_len="
         f"{c.data.seq_len}")
    need(t.loss_logits_dtype in ("float32", "bfloat16"),
         f"config.train.loss_logits_dtype={t.loss_logits_dtype!r}: choose 'float32' or 'bfloat16'")
    need(t.loss_logits_dtype == "float32" or t.loss_chunks > 0,
         f"config.train.loss_logits_dtype={t.loss_logits_dtype!r} needs the fused loss: set "
         "config.train.loss_chunks > 0 (e.g. 8) or loss_logits_dtype='float32'")

    need(o.schedule in SCHEDULES, f"config.optim.schedule={o.schedule!r}: choose one of {SCHEDULES}")
    need(o.lr >= 0, f"config.optim.lr={o.lr} must be >= 0")
    need(o.warmup_steps >= 0, f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
    horizon = o.decay_steps or t.steps
    need(o.schedule in ("constant", "linear") or o.warmup_steps < horizon,
         f"config.optim.warmup_steps={o.warmup_steps} must be below the schedule horizon "
         f"({horizon}: optim.decay_steps or train.steps)")
    need(0 <= o.final_lr_ratio <= 1, "config.optim.final_lr_ratio must be in [0, 1]")
    need(0 < o.wsd_decay_fraction <= 1, "config.optim.wsd_decay_fraction must be in (0, 1]")
    need(o.clip_norm > 0, "config.optim.clip_norm must be > 0")

    need(c.checkpoint.every_steps > 0, "config.checkpoint.every_steps must be positive")
    need(c.checkpoint.keep > 0, "config.checkpoint.keep must be positive")
    need(c.checkpoint.every_seconds >= 0, "config.checkpoint.every_seconds must be >= 0 (0 = off)")
    need(t.skip_sigma >= 0, f"config.train.skip_sigma={t.skip_sigma} must be >= 0 (0 = off)")
    need(t.skip_sigma == 0 or t.skip_window >= 4,
         f"config.train.skip_window={t.skip_window} must be >= 4 when skip_sigma is set")
    need(t.rollback_after >= 0 and t.rollback_skip_batches >= 0,
         "config.train.rollback_after and rollback_skip_batches must be >= 0")

    if num_devices is not None:
        shape = mesh_shape(c, num_devices)
        batch_shards = shape["data"] * shape["fsdp"]
        need(mb % batch_shards == 0,
             f"the micro-batch of {mb} sequences is not divisible by the data-parallel size "
             f"{batch_shards} (mesh.data * mesh.fsdp = {shape['data']} * {shape['fsdp']}); change "
             "config.train.global_batch_size / micro_batch_size or the mesh")
        need(m.n_heads % shape["tensor"] == 0 and m.n_kv_heads % shape["tensor"] == 0,
             f"config.mesh.tensor={shape['tensor']} must divide n_heads={m.n_heads} and "
             f"n_kv_heads={m.n_kv_heads}")
        need(m.mlp_hidden % shape["tensor"] == 0,
             f"config.mesh.tensor={shape['tensor']} must divide model.mlp_hidden={m.mlp_hidden}")


def count_params(m) -> dict[str, int]:
    """Exact parameter counts from the shapes (matches the initialised model)."""
    hd = head_dim(m)
    q, kv = m.n_heads * hd, m.n_kv_heads * hd
    attn = m.d_model * q + 2 * m.d_model * kv + q * m.d_model
    mlp = 3 * m.d_model * m.mlp_hidden
    norms_per_layer = q + kv + 2 * m.d_model
    embedding = m.padded_vocab_size * m.d_model
    lm_head = m.padded_vocab_size * m.d_model
    total = embedding + lm_head + m.n_layers * (attn + mlp + norms_per_layer) + m.d_model
    matmul = lm_head + m.n_layers * (attn + mlp)
    return {"total": total, "matmul": matmul, "embedding": embedding}


def flops_per_token(m, seq_len: int) -> int:
    """Training FLOPs per token, PaLM convention (as the original implementation):
    6 * N_matmul + 12 * n_layers * d_model * seq_len (attention without causal halving)."""
    return 6 * count_params(m)["matmul"] + 12 * m.n_layers * m.d_model * seq_len
