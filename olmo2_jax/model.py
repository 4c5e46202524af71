"""The OLMo 2 transformer in flax.linen (pure functional, logical axis names).

Shape key for suffixes: B batch, T query positions, S key positions, D d_model,
N query heads, K kv heads, H head_dim, F MLP hidden, V padded vocab.

Block ("reordered norm", norm on sub-layer outputs, no norm on the block input):
    h = x + RMSNorm(Attn(x));  out = h + RMSNorm(MLP(h))
QK-norm spans the full projection width (before the head split) and comes before
RoPE, exactly as the transformers `Olmo2Attention` parity reference does.
Parameters stay in `param_dtype` (fp32 master weights); matmuls run in `dtype`.
Which implementation runs each op (XLA or a kernel) is decided in ops.py.

Logical axes: batch, seq, embed, vocab, heads, kv_heads, head_dim, mlp, layers.
Their mapping onto mesh axes lives only in `sharding.py`.

Decoding (`Transformer.decode`) reuses the same modules: each layer reads its slice of a
KV cache holding the earlier tokens and returns the keys/values of the new tokens; the
caller (generate.py) writes those into the cache once per step, so the layer loop never
copies the cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from kernels.attention import RESIDUAL_NAMES
from olmo2_jax import config as config_lib
from olmo2_jax import ops

Array = jax.Array


def _save_dots_and_attention(prim, *args, **params) -> bool:
    """Saves the weight matmuls' outputs (dots without batch dims: never the T x T scores
    of XLA attention) and a fused attention kernel's outputs (output and softmax
    statistics), so the backward pass never re-runs the attention forward."""
    return (prim.name.startswith("dot_product_attention_fwd")  # cuDNN
            or prim.name == "pallas_call"  # kernels/: the forward's output and logsumexp
            or params.get("name") in RESIDUAL_NAMES  # the same, named (Mosaic GPU kernels)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": _save_dots_and_attention}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The static model hyperparameters (hashable, so it can sit on a linen Module)."""

    vocab_size: int = 100_278
    padded_vocab_size: int = 100_352
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 16
    head_dim: int = 128
    mlp_hidden: int = 8192
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "dots"  # "none" or a key of REMAT_POLICIES
    attention: str = "auto"  # ops.attention_impl
    kernels: str = "auto"  # ops.kernels_on

    @classmethod
    def from_config(cls, m) -> "ModelConfig":
        """Builds from the `config.model` ConfigDict: every field of the same name, with
        head_dim resolved and the dtypes as numpy dtypes."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in m.items() if k in names}
        values.update(head_dim=config_lib.head_dim(m), dtype=jnp.dtype(m.dtype),
                      param_dtype=jnp.dtype(m.param_dtype))
        return cls(**values)


def _init(cfg: ModelConfig):
    """Truncated normal, std `init_std`, cut at +-3 std (every matrix, embedding included)."""
    return nn.initializers.truncated_normal(cfg.init_std, lower=-3.0, upper=3.0)


def _param(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        module.cfg.param_dtype)


def _kernels(module: nn.Module) -> str:
    """cfg.kernels, but XLA while initialising (tiny shapes, no backward)."""
    return "xla" if module.is_initializing() else module.cfg.kernels


class RMSNorm(nn.Module):
    """RMSNorm over the trailing `len(axes)` dims, in fp32, weight only (no bias).
    With `positions` (QK-norm), RoPE follows the norm."""

    cfg: ModelConfig
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x: Array, positions: Array | None = None) -> Array:
        cfg = self.cfg
        scale = _param(self, "scale", x.shape[-len(self.axes):], self.axes,
                       nn.initializers.ones)
        if positions is None:
            return ops.rms_norm(x, scale, cfg.norm_eps, cfg.dtype, kernels=_kernels(self),
                                axes=self.axes)
        return ops.qk_norm_rope(x, scale, positions, cfg.rope_theta, cfg.norm_eps, cfg.dtype,
                                kernels=_kernels(self), axes=self.axes)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
                 kv_cache=None, slots=None):
        """Training / full forward when `slots` is None; else decoding with a KV cache
        (`slots` = (index, start_B), see `ops.cached_attention`). Returns (out, the new
        tokens' k/v in the cache layout BKTH, or None)."""
        cfg, dt = self.cfg, self.cfg.dtype
        N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        wq = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"), _init(cfg))
        wk = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), _init(cfg))
        wv = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), _init(cfg))
        wo = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"), _init(cfg))
        q = ops.dense("BTD,DNH->BTNH", x_BTD, wq, dt)
        k = ops.dense("BSD,DKH->BSKH", x_BTD, wk, dt)
        v = ops.dense("BSD,DKH->BSKH", x_BTD, wv, dt)
        # Full-width QK-norm: normalise over (heads, head_dim) together, then RoPE.
        q = RMSNorm(cfg, axes=("heads", "head_dim"), name="q_norm")(q, positions_BT)
        k = RMSNorm(cfg, axes=("kv_heads", "head_dim"), name="k_norm")(k, positions_BT)
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))
        if slots is None:
            out, new_kv = ops.attention(q, k, v, segment_ids_BT, cfg.attention), None
        else:
            out = ops.cached_attention(q, k, v, kv_cache, *slots)
            new_kv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        return ops.dense("BTNH,NHD->BTD", out, wo, dt), new_kv


class MLP(nn.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down, no biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg, dt = self.cfg, self.cfg.dtype
        D, F = cfg.d_model, cfg.mlp_hidden
        w_gate = _param(self, "gate_proj", (D, F), ("embed", "mlp"), _init(cfg))
        w_up = _param(self, "up_proj", (D, F), ("embed", "mlp"), _init(cfg))
        w_down = _param(self, "down_proj", (F, D), ("mlp", "embed"), _init(cfg))
        h = ops.swiglu(ops.dense("BTD,DF->BTF", x_BTD, w_gate, dt),
                       ops.dense("BTD,DF->BTF", x_BTD, w_up, dt), kernels=_kernels(self))
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return ops.dense("BTF,FD->BTD", h, w_down, dt)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache=None, slots=None):
        attn, new_kv = Attention(self.cfg, name="attn")(x_BTD, positions_BT, segment_ids_BT,
                                                        kv_cache, slots)
        h = x_BTD + RMSNorm(self.cfg, name="post_attention_norm")(attn)
        out = h + RMSNorm(self.cfg, name="post_mlp_norm")(MLP(self.cfg, name="mlp")(h))
        out = nn.with_logical_constraint(out, ("batch", "seq", "embed"))
        return out, new_kv  # (carry, per-layer output) as nn.scan expects


class Transformer(nn.Module):
    """Token ids -> fp32 logits over the padded vocabulary."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = _param(self, "embedding", (cfg.padded_vocab_size, cfg.d_model),
                                ("vocab", "embed"), _init(cfg))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg)
        self.lm_head = _param(self, "lm_head", (cfg.d_model, cfg.padded_vocab_size),
                              ("embed", "vocab"), _init(cfg))

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> Array:
        """Final-norm hidden states (B, T, D): what the LM head (or a chunked loss) consumes."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x, _ = self._layers(self._embed(tokens_BT), positions_BT, segment_ids_BT, None, None)
        return self.final_norm(x)

    def _embed(self, tokens_BT):
        # Gather from the table with its embed dim whole (FSDP all-gathers it, as for every
        # weight); a gather from an fsdp-sharded embed dim would be fully rematerialised.
        table = nn.with_logical_constraint(self.embedding.astype(self.cfg.dtype), ("vocab", None))
        x = jnp.take(table, tokens_BT, axis=0)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    def _layers(self, x, positions_BT, segment_ids_BT, kv_cache, slots):
        """All blocks; with a cache, also the new tokens' (k, v) stacked over layers."""
        if self.cfg.scan_layers:
            return self.layers(x, positions_BT, segment_ids_BT, kv_cache, slots)
        new = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else jax.tree.map(lambda c: c[i], kv_cache)
            x, kv = layer(x, positions_BT, segment_ids_BT, layer_cache, slots)
            new.append(kv)
        stacked = None if slots is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
        return x, stacked

    def decode(self, tokens_BT, positions_BT, kv_cache, index, start_B):
        """Logits of the last new token (B, V) and the new tokens' (k, v), each
        (layers, B, kv_heads, T, head_dim), for the caller to write at cache slot `index`.

        The T new tokens sit at slots index..index+T-1 of left-padded rows whose real
        tokens start at slot `start_B`; `kv_cache` = (k, v) of shape (layers, B, K, S, H)
        (slots contiguous per head, as the decode reads them) holding slots < index, or
        None for a prefill into an empty cache.
        """
        x, new_kv = self._layers(self._embed(tokens_BT), positions_BT, None, kv_cache,
                                 (index, start_B))
        return self.logits(self.final_norm(x[:, -1:]))[:, 0], new_kv

    def logits(self, hidden_BTD: Array) -> Array:
        logits = jnp.einsum("BTD,DV->BTV", hidden_BTD.astype(self.cfg.dtype),
                            self.lm_head.astype(self.cfg.dtype),
                            preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> Array:
        return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT))
