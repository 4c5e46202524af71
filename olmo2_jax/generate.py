"""Batched generation with a KV cache: one jitted prefill, one jitted decode loop.

    python -m olmo2_jax.generate --ckpt=CKPT --prompt="text" --max_new_tokens=32 --temperature=0
    python -m olmo2_jax.generate --ckpt=CKPT --prompt_ids=1,2,3 --max_new_tokens=32

prints one JSON line {"tokens": [...], "text": ...} (text is null without a tokenizer).

Prompts of different lengths are left-padded to one length, so every row writes its
next token into the same cache slot and a step is one dense update; each row's RoPE
positions and attention mask skip its padding, so a row's tokens do not depend on the
others in the batch. The whole decode runs in one `lax.while_loop` that stops once
every row has emitted a stop token or `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from olmo2_jax import sharding
from olmo2_jax.model import ModelConfig, Transformer

CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")  # Transformer.decode
# The whole decode loop (while loop included) as one CUDA graph; XLA's default leaves
# the loop out, so each step's kernels are launched one by one from the host.
DECODE_GPU_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1}
PROMPT_BUCKET = 8  # prompt lengths are rounded up to this, so few lengths compile


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn; static (each setting compiles once).

    temperature 0 = greedy (argmax). Otherwise softmax(logits / temperature) restricted to
    the `top_k` most likely tokens (0 = all) and to the smallest set whose probability
    reaches `top_p` (1.0 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus cut)")


def sample_logits(logits_BV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids (B,) from fp32 logits."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (the first always is).
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def mask_padded_vocab(logits_BV, vocab_size: int):
    """Rows of the padded vocabulary beyond the real tokens are never generated."""
    if vocab_size >= logits_BV.shape[-1]:
        return logits_BV
    ok = jnp.arange(logits_BV.shape[-1]) < vocab_size
    return jnp.where(ok, logits_BV, jnp.finfo(logits_BV.dtype).min)


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
    """(tokens (batch, length), start (batch,)): row b's prompt sits at slots start[b]:.
    Rows beyond the prompts repeat the first prompt (filler for an even batch split)."""
    tokens = np.full((batch, length), pad_id, np.int32)
    start = np.zeros((batch,), np.int32)
    for b in range(batch):
        p = prompts[b] if b < len(prompts) else prompts[0]
        tokens[b, length - len(p):] = p
        start[b] = length - len(p)
    return tokens, start


class Generator:
    """Compiled prefill + decode for one model on one mesh; reuse it across calls.

    `params` may be fp32 master weights: they are cast once to the compute dtype, since
    decoding is bound by reading the weights (and the cache) every step. `unroll_layers`
    turns the layers into straight-line code inside the decode loop, with the weights
    split once into one array per layer: slicing a layer out of the stacked (scanned)
    weights inside the loop made XLA copy every weight matrix on every step (1.2 of
    6.2 ms per step at the 1B shape on the H200, bench/kernel_profile.py). On GPUs the decode
    loop is one CUDA graph (XLA command buffers including the while loop), which removes
    the per-kernel launch gaps of a step of ~400 small kernels.
    `cache_chunk` = C splits the decode into compiled segments of C steps, each reading
    only the cache slots filled by its end (less cache traffic, one compile per segment);
    None reads the whole cache every step.
    """

    def __init__(self, cfg: ModelConfig, params, mesh=None, *, cast_params: bool = True,
                 unroll_layers: bool = True, cache_chunk: int | None = None):
        if cache_chunk is not None and cache_chunk < 1:
            raise ValueError(f"cache_chunk={cache_chunk} must be >= 1 (or None)")
        self.cache_chunk = cache_chunk
        split = unroll_layers and cfg.scan_layers
        if split:
            cfg = dataclasses.replace(cfg, scan_layers=False)
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.mesh = mesh or jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                              sharding.MESH_AXES)
        abstract = jax.eval_shape(self.model.init, jax.random.PRNGKey(0),
                                  jnp.zeros((1, 1), jnp.int32))
        self.param_shardings = sharding.logical_shardings(self.mesh, abstract)["params"]
        dtype = cfg.dtype if cast_params else None

        def prepare(p):
            p = jax.tree.map(lambda x: x.astype(dtype or x.dtype), p)
            if split:
                p = dict(p)
                stacked = p.pop("layers")
                p.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                          for i in range(cfg.n_layers)})
            return p

        with self._ctx():
            self.params = jax.jit(prepare, out_shardings=self.param_shardings)(params)
        self.cache_sharding = nn.logical_to_mesh_sharding(P(*CACHE_AXES), self.mesh,
                                                          sharding.RULES)
        self.batch_multiple = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len",))
        self._decode = jax.jit(
            self._decode_impl, donate_argnames=("carry",),
            static_argnames=("sampling", "stop", "first_slot", "end", "visible"),
            compiler_options=DECODE_GPU_OPTIONS if self.mesh.devices.flat[0].platform == "gpu"
            else None)

    @contextlib.contextmanager
    def _ctx(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
            yield

    def _prefill_impl(self, params, tokens_BT, start_B, *, cache_len):
        cfg = self.cfg
        B, T = tokens_BT.shape
        positions = jnp.maximum(jnp.arange(T)[None] - start_B[:, None], 0)
        logits, (k, v) = self.model.apply({"params": params}, tokens_BT, positions, None, 0,
                                          start_B, method=Transformer.decode)
        shape = (cfg.n_layers, B, cfg.n_kv_heads, cache_len, cfg.head_dim)
        cache = tuple(
            jax.lax.with_sharding_constraint(
                jax.lax.dynamic_update_slice(jnp.zeros(shape, cfg.dtype), x.astype(cfg.dtype),
                                             (0, 0, 0, 0, 0)), self.cache_sharding)
            for x in (k, v))
        return logits, cache

    def _decode_impl(self, params, carry, start_B, *, sampling, stop, first_slot, end,
                     visible):
        """Runs decode steps until step `end` (or until every row is done); the first step
        samples from the prefill logits; finished rows emit -1. Also records each token's
        log-probability under the model (temperature 1, no cut). Attention reads cache
        slots [0, visible) only (None = all)."""
        stop_ids = jnp.asarray(stop or (-2,), jnp.int32)

        def cond(c):
            i, _, _, _, _, done, _ = c
            return (i < end) & ~jnp.all(done)

        def body(c):
            i, cache, logits, out, out_lp, done, rng = c
            rng, key = jax.random.split(rng)
            logits = mask_padded_vocab(logits, self.cfg.vocab_size)
            tok = sample_logits(logits, key, sampling)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)
            tok = jnp.where(done, -1, tok)
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
            out_lp = jax.lax.dynamic_update_slice(out_lp, jnp.where(done[:, None], 0.0, lp),
                                                  (0, i))
            done = done | jnp.isin(tok, stop_ids)
            index = first_slot + i
            view = cache if visible is None else tuple(c[:, :, :, :visible] for c in cache)
            logits, (k, v) = self.model.apply(
                {"params": params}, jnp.maximum(tok, 0)[:, None], (index - start_B)[:, None],
                view, index, start_B, method=Transformer.decode)
            cache = tuple(
                jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, 0, 0, index, 0))
                for c, n in zip(cache, (k, v)))
            return i + 1, cache, logits, out, out_lp, done, rng

        return jax.lax.while_loop(cond, body, carry)

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
                 seed: int = 0, return_logprobs: bool = False):
        """New tokens for each prompt (a stop token, when hit, is the last one kept); with
        `return_logprobs`, also each new token's log-probability under the model."""
        tokens, start, n = self.prepare(prompts, max_new_tokens, sampling)
        B, P = tokens.shape
        stop = tuple(int(t) for t in stop_tokens)
        with self._ctx():
            logits, cache = self._prefill(self.params, tokens, start,
                                          cache_len=P + max_new_tokens)
            carry = (jnp.int32(0), cache, logits, jnp.full((B, max_new_tokens), -1, jnp.int32),
                     jnp.zeros((B, max_new_tokens), jnp.float32), jnp.zeros((B,), bool),
                     jax.random.PRNGKey(seed))
            chunk = self.cache_chunk or max_new_tokens
            for end in range(chunk, max_new_tokens + chunk, chunk):
                end = min(end, max_new_tokens)
                carry = self._decode(self.params, carry, start, sampling=sampling, stop=stop,
                                     first_slot=P, end=end,
                                     visible=P + end if end < max_new_tokens else None)
        out, lp = (np.asarray(x)[:n] for x in jax.device_get(carry[3:5]))
        tokens = [[int(t) for t in row if t >= 0] for row in out]
        if not return_logprobs:
            return tokens
        return tokens, [row[:len(t)].tolist() for row, t in zip(lp, tokens)]

    def prepare(self, prompts, max_new_tokens, sampling):
        """Checks the request (clear errors before any compile) and lays out the batch."""
        sampling.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        bad = [t for p in prompts for t in p if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")
        length = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        batch = -(-len(prompts) // self.batch_multiple) * self.batch_multiple
        tokens, start = left_pad(prompts, length, batch)
        put = lambda x: jax.device_put(  # noqa: E731
            x, NamedSharding(self.mesh, P(sharding.BATCH_AXES)))
        return put(tokens), put(start), len(prompts)


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={text!r}: expected comma-separated integers, e.g. 1,2,3")


def main(argv=None) -> None:
    from absl import flags

    from olmo2_jax import checkpoint

    f = flags.FlagValues()
    flags.DEFINE_string("ckpt", None, "Checkpoint directory (a CheckpointManager dir or a "
                        "workdir holding checkpoints/).", flag_values=f)
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", flag_values=f)
    flags.DEFINE_string("prompt", None, "Prompt text, encoded with the tokenizer the "
                        "checkpoint was trained with.", flag_values=f)
    flags.DEFINE_string("tokenizer", None, "Tokenizer spec (dolma2, sentencepiece:<file.model>, "
                        "hf:<tokenizer.json>) for a checkpoint that records none; overrides "
                        "the recorded one.", flag_values=f)
    flags.DEFINE_string("prompt_ids", None, "Prompt token ids, comma-separated.", flag_values=f)
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.", flag_values=f)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=f)
    flags.DEFINE_integer("top_k", 0, "0 = off.", flag_values=f)
    flags.DEFINE_float("top_p", 1.0, "1 = off.", flag_values=f)
    flags.DEFINE_string("stop_ids", None, "Stop token ids, comma-separated; default the "
                        "tokenizer's EOS when there is one.", flag_values=f)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=f)
    try:
        f(sys.argv if argv is None else argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    # A bad flag, a damaged checkpoint (CheckpointError) or a missing one: one line on stderr.
    checkpoint.run_cli("generate", lambda: _main(f))


def _main(f) -> None:
    from olmo2_jax import checkpoint

    if not f.ckpt:
        raise ValueError("--ckpt is required")
    if (f.prompt is None) == (f.prompt_ids is None):
        raise ValueError("pass exactly one of --prompt or --prompt_ids")
    directory = checkpoint.resolve_dir(f.ckpt)
    meta = checkpoint.read_meta(directory, f.step)
    tok = checkpoint.load_tokenizer(directory, meta, f.tokenizer)
    if f.prompt is not None:
        if tok is None:
            raise ValueError(f"checkpoint {f.ckpt} holds no tokenizer (it predates "
                             "tokenizer records, or its run or HF source named none): "
                             f"{checkpoint.NO_TOKENIZER_FIX}, or pass --prompt_ids instead "
                             "of --prompt")
        ids = tok.encode(f.prompt)
    else:
        ids = _parse_ids(f.prompt_ids, "prompt_ids")
    stop = (_parse_ids(f.stop_ids, "stop_ids") if f.stop_ids is not None
            else [tok.eos_id] if tok is not None and tok.eos_id is not None else [])
    sampling = Sampling(f.temperature, f.top_k, f.top_p)
    sampling.validate()
    cfg = checkpoint.model_config(meta)
    mesh = sharding.inference_mesh()
    params = checkpoint.load_params(directory, cfg, mesh, meta["step"])
    gen = Generator(cfg, params, mesh)
    out = gen([ids], max_new_tokens=f.max_new_tokens, sampling=sampling, stop_tokens=stop,
              seed=f.seed)[0]
    print(json.dumps({"tokens": out, "text": tok.decode(out) if tok is not None else None}))


if __name__ == "__main__":
    main()
