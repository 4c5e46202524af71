"""Hugging Face transformers `Olmo2ForCausalLM` <-> olmo2_jax checkpoints.

    python -m olmo2_jax.convert from_hf --hf_dir=DIR --out=CKPT [--config=configs/1b.py]
    python -m olmo2_jax.convert to_hf --ckpt=CKPT --out=DIR [--dtype=bfloat16]

`from_hf` writes a step-0 checkpoint holding only the params (and the config in its meta):
`generate` and `to_hf` read it directly; training starts from it with
`--config.train.init_from=CKPT` (fresh optimiser state, new workdir). `to_hf` reads the
params of a checkpoint of any stage and ignores the rest (optimiser, data iterator), and
writes the tokenizer the checkpoint records (checkpoint.py) as files AutoTokenizer loads.

Both directions go through one table (`HF_TABLE`) and stream one tensor at a time, so
the host never holds two copies of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from olmo2_jax import checkpoint
from olmo2_jax import config as config_lib
from olmo2_jax import sharding
from olmo2_jax.model import ModelConfig, Transformer

# One row per tensor: transformers name ({layer} = per layer), our param path ("layers/..."
# = stacked over a leading layer axis, or layers_{i}/... when not scanning), the
# transformers shape in the dims below, and whether the matrix is transposed (torch
# Linear stores (out, in); we store (in, out), with heads split out of the wide dim).
HF_TABLE = (
    ("model.embed_tokens.weight", "embedding", ("V", "D"), False),
    ("model.norm.weight", "final_norm/scale", ("D",), False),
    ("lm_head.weight", "lm_head", ("V", "D"), True),
    ("model.layers.{layer}.self_attn.q_proj.weight", "layers/attn/q_proj", ("NH", "D"), True),
    ("model.layers.{layer}.self_attn.k_proj.weight", "layers/attn/k_proj", ("KH", "D"), True),
    ("model.layers.{layer}.self_attn.v_proj.weight", "layers/attn/v_proj", ("KH", "D"), True),
    ("model.layers.{layer}.self_attn.o_proj.weight", "layers/attn/o_proj", ("D", "NH"), True),
    ("model.layers.{layer}.self_attn.q_norm.weight", "layers/attn/q_norm/scale", ("NH",), False),
    ("model.layers.{layer}.self_attn.k_norm.weight", "layers/attn/k_norm/scale", ("KH",), False),
    ("model.layers.{layer}.mlp.gate_proj.weight", "layers/mlp/gate_proj", ("F", "D"), True),
    ("model.layers.{layer}.mlp.up_proj.weight", "layers/mlp/up_proj", ("F", "D"), True),
    ("model.layers.{layer}.mlp.down_proj.weight", "layers/mlp/down_proj", ("D", "F"), True),
    ("model.layers.{layer}.post_attention_layernorm.weight", "layers/post_attention_norm/scale",
     ("D",), False),
    ("model.layers.{layer}.post_feedforward_layernorm.weight", "layers/post_mlp_norm/scale",
     ("D",), False),
)
# Buffers some exports carry that are recomputed, not learned.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
HF_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
    """A checkpoint or HF folder does not fit the model; the message says what and how."""


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {"V": cfg.padded_vocab_size, "D": cfg.d_model, "NH": cfg.n_heads * cfg.head_dim,
            "KH": cfg.n_kv_heads * cfg.head_dim, "F": cfg.mlp_hidden}


def entries(cfg: ModelConfig) -> Iterator[tuple[str, str, int | None, tuple[int, ...], bool]]:
    """(hf name, our path, layer or None, hf shape, transpose) for every tensor."""
    dims = _dims(cfg)
    for layer in range(cfg.n_layers):
        for name, path, shape, transpose in HF_TABLE:
            if "{layer}" in name:
                yield (name.format(layer=layer), path, layer, tuple(dims[d] for d in shape),
                       transpose)
    for name, path, shape, transpose in HF_TABLE:
        if "{layer}" not in name:
            yield name, path, None, tuple(dims[d] for d in shape), transpose


def to_hf_tensor(x: np.ndarray, hf_shape, transpose: bool) -> np.ndarray:
    return x.reshape(hf_shape[::-1]).T if transpose else x.reshape(hf_shape)


def from_hf_tensor(x: np.ndarray, our_shape, transpose: bool) -> np.ndarray:
    return (x.T if transpose else x).reshape(our_shape)


def _get(params, path: str, layer: int | None, scan: bool):
    """Our array for a table path (the layer's slice when scanning)."""
    keys = path.split("/")
    if keys[0] == "layers" and not scan:
        keys[0] = f"layers_{layer}"
    x = params
    for k in keys:
        x = x[k]
    return x[layer] if keys[0] == "layers" else x


def to_hf_state_dict(params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy tensor in transformers layout) one at a time, from our params."""
    for name, path, layer, hf_shape, transpose in entries(cfg):
        x = _get(params, path, layer, cfg.scan_layers)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            x = multihost_utils.process_allgather(x, tiled=True)
        yield name, np.ascontiguousarray(to_hf_tensor(np.asarray(jax.device_get(x)), hf_shape,
                                                      transpose))


def check_names(found: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    """Raises ConversionError listing missing, unexpected and mis-shaped tensors."""
    expected = {name: shape for name, _, _, shape, _ in entries(cfg)}
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: {tuple(found[k])} (expected {expected[k]})"
                   for k in set(found) & set(expected) if tuple(found[k]) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{what} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                 for what, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", wrong)) if items]
        raise ConversionError(
            f"{where} does not match an Olmo2 model of the config derived from its config.json "
            f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}/{cfg.n_kv_heads} "
            f"heads, head_dim {cfg.head_dim}): " + "; ".join(parts))


# --- Configs.

def model_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """Our `config.model` fields from a transformers Olmo2 config.json."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "olmo2" or (arch and "Olmo2ForCausalLM" not in arch):
        raise ConversionError(f"{where}: model_type={hf.get('model_type')!r}, "
                              f"architectures={arch}; expected an olmo2 Olmo2ForCausalLM")
    if hf.get("tie_word_embeddings"):
        raise ConversionError(f"{where}: tie_word_embeddings=true; OLMo 2 has a separate LM "
                              "head and this converter only maps untied weights")
    if hf.get("attention_bias"):
        raise ConversionError(f"{where}: attention_bias=true; OLMo 2 has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{where}: rope_type={rope['rope_type']!r}; only plain RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConversionError(f"{where}: no rope_theta (in rope_parameters or at the top level)")
    n_heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], padded_vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, mlp_hidden=hf["intermediate_size"],
        rope_theta=float(theta), norm_eps=float(hf["rms_norm_eps"]),
        max_seq_len=hf.get("max_position_embeddings", 4096))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    fields["head_dim"] = 0 if head_dim * n_heads == hf["hidden_size"] else head_dim
    return fields


def hf_config_from_model(m, token_ids: dict, dtype: str) -> dict:
    """config.json for transformers `Olmo2ForCausalLM` from our `config.model`."""
    hd = config_lib.head_dim(m)
    out = {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "vocab_size": m.padded_vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.mlp_hidden, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rope_parameters": {"rope_theta": float(m.rope_theta), "rope_type": "default"},
        "rms_norm_eps": float(m.norm_eps), "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "use_cache": True, "initializer_range": m.init_std,
        "dtype": dtype,
    }
    if hd * m.n_heads != m.d_model:
        out["head_dim"] = hd
    # transformers needs vocab_size = the embedding rows; the real token count rides along
    # so from_hf gives back the same model config (padding ids stay unsampleable, soups match).
    out["unpadded_vocab_size"] = m.vocab_size
    out.update(token_ids)  # explicit nulls: transformers' defaults (eos 50279) would be wrong
    return out


def _token_ids(meta: dict, overrides: dict, from_tokenizer: dict) -> dict:
    """bos/eos/pad ids: flags, else those carried from the source HF config, else the
    tokenizer's, else none."""
    src = meta.get("hf", {})
    out = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[k] = next((d[k] for d in (overrides, src, from_tokenizer)
                       if d.get(k) is not None), None)
    return out


# --- from_hf.

class SafetensorsFolder:
    """The tensors of an HF folder (one file or shards + index), read lazily by name."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                raise ConversionError(f"{hf_dir}: no *.safetensors files (and no "
                                      "model.safetensors.index.json); save the model with "
                                      "save_pretrained(..., safe_serialization=True)")
            weight_map = {}
            for fname in files:
                with safe_open(os.path.join(hf_dir, fname), "numpy") as h:
                    weight_map.update({k: fname for k in h.keys()})
        self._handles = {}
        for fname in sorted(set(weight_map.values())):
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise ConversionError(f"{index} names {fname}, which is missing from {hf_dir}")
            try:
                self._handles[fname] = safe_open(path, "numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{path} is not a readable safetensors file ({e}); "
                                      "re-download or re-save that shard") from e
        held = {f: set(h.keys()) for f, h in self._handles.items()}
        for name, fname in weight_map.items():
            if name not in held[fname]:
                elsewhere = sorted(f for f, keys in held.items() if name in keys)
                fix = (f"the tensor is in {elsewhere[0]}: fix the index's weight_map" if elsewhere
                       else "re-download or re-save the folder (save_pretrained)")
                raise ConversionError(f"{index} names tensor {name} in {fname}, which does not "
                                      f"hold it; {fix}")
        self.weight_map = weight_map
        self.shapes = {k: tuple(self._handles[f].get_slice(k).get_shape())
                       for k, f in weight_map.items()}
        self.dtypes = {self._handles[f].get_slice(k).get_dtype() for k, f in weight_map.items()}

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.weight_map[name]].get_tensor(name)


def config_from_hf(hf_dir: str, base: ml_collections.ConfigDict | None = None):
    """(config, hf config.json dict): `base` (default `base_config()`) with the model shape
    of the HF folder."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"--hf_dir={hf_dir}: no config.json (expected a transformers "
                              "Olmo2ForCausalLM folder written by save_pretrained)")
    with open(path) as f:
        hf = json.load(f)
    config = base if base is not None else config_lib.base_config()
    fields = model_fields_from_hf(hf, path)
    fields["vocab_size"] = _true_vocab_size(hf_dir, hf, path)
    with config.unlocked():
        config.model.update(fields)
        config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    return config, hf


def _true_vocab_size(hf_dir: str, hf: dict, where: str) -> int:
    """The real token count: `unpadded_vocab_size` (written by to_hf), else the size of the
    folder's tokenizer.json when smaller than the embedding (released OLMo 2: 100278 of
    100352 rows), else the embedding rows."""
    rows = hf["vocab_size"]
    if hf.get("unpadded_vocab_size") is not None:
        n = hf["unpadded_vocab_size"]
        if not 0 < n <= rows:
            raise ConversionError(f"{where}: unpadded_vocab_size={n} must be in (0, "
                                  f"vocab_size={rows}]")
        return n
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return rows
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        vocab = (spec.get("model") or {}).get("vocab") or {}  # a list for Unigram models
        ids = [*(range(len(vocab)) if isinstance(vocab, list) else vocab.values()),
               *(t["id"] for t in spec.get("added_tokens", []))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: "
                              f"{e}); fix or remove it") from e
    return min(rows, max(ids) + 1) if ids else rows


def from_hf(hf_dir: str, out: str, base_config: ml_collections.ConfigDict | None = None,
            mesh=None) -> str:
    """Converts an HF Olmo2 folder into a step-0 olmo2_jax checkpoint at `out`."""
    config, hf = config_from_hf(hf_dir, base_config)
    if base_config is not None:  # base_config() alone is a template, not a runnable config
        config_lib.validate(config)
    cfg = ModelConfig.from_config(config.model)
    folder = SafetensorsFolder(hf_dir)
    check_names(folder.shapes, cfg, hf_dir)
    out = checkpoint.check_new_dir(out)  # before any work; write_params checks again
    if mesh is None:
        mesh = sharding.make_mesh(config)

    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 1), jnp.int32))
    shardings = sharding.logical_shardings(mesh, abstract)["params"]
    shapes = nn.unbox(abstract)["params"]
    params = {}

    def place(x_np, leaf_sharding):
        x_np = x_np.astype(cfg.param_dtype)
        return jax.make_array_from_callback(x_np.shape, leaf_sharding, lambda idx: x_np[idx])

    def setpath(tree, keys, value):
        for k in keys[:-1]:
            tree = tree.setdefault(k, {})
        tree[keys[-1]] = value

    def lookup(tree, keys):
        for k in keys:
            tree = tree[k]
        return tree

    write_layer = jax.jit(lambda stacked, x, i: jax.lax.dynamic_update_index_in_dim(
        stacked, x, i, 0), donate_argnums=0)
    # Leaves outer, layers inner: a stacked leaf is filled in place one layer at a time,
    # so the host holds one transformers tensor and the devices one leaf (+ one layer).
    for name_t, path, shape_t, transpose in HF_TABLE:
        keys = path.split("/")
        if "{layer}" not in name_t:
            leaf = lookup(shapes, keys)
            x = from_hf_tensor(folder.get(name_t), leaf.shape, transpose)
            setpath(params, keys, place(x, lookup(shardings, keys)))
            continue
        if cfg.scan_layers:
            leaf, leaf_sharding = lookup(shapes, keys), lookup(shardings, keys)
            layer_sharding = NamedSharding(mesh, P(*leaf_sharding.spec[1:]))
            stacked = jax.jit(lambda: jnp.zeros(leaf.shape, leaf.dtype),
                              out_shardings=leaf_sharding)()
            for i in range(cfg.n_layers):
                x = from_hf_tensor(folder.get(name_t.format(layer=i)), leaf.shape[1:], transpose)
                stacked = write_layer(stacked, place(x, layer_sharding), i)
            setpath(params, keys, stacked)
        else:
            for i in range(cfg.n_layers):
                k_i = [f"layers_{i}"] + keys[1:]
                leaf = lookup(shapes, k_i)
                x = from_hf_tensor(folder.get(name_t.format(layer=i)), leaf.shape, transpose)
                setpath(params, k_i, place(x, lookup(shardings, k_i)))

    meta = {"config": config.to_dict(),
            "hf": {"source": os.path.abspath(hf_dir), "dtype": _hf_dtype(hf, folder),
                   **{k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}}
    tokenizer = [os.path.join(hf_dir, f) for f in TOKENIZER_FILES
                 if os.path.exists(os.path.join(hf_dir, f))]
    return checkpoint.write_params(out, params, meta, step=0, tokenizer_files=tokenizer)


def _hf_dtype(hf: dict, folder: SafetensorsFolder) -> str:
    """The source's storage dtype name, kept so to_hf can write the same by default."""
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    found = {names.get(d, d) for d in folder.dtypes}
    return found.pop() if len(found) == 1 else str(hf.get("dtype") or hf.get("torch_dtype")
                                                   or "float32")


# --- to_hf.

def to_hf(ckpt: str, out: str, *, step: int | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 2**30, token_ids: dict | None = None,
          tokenizer: str | None = None) -> list[str]:
    """Writes an HF Olmo2 folder from the params of any olmo2_jax checkpoint, with the
    tokenizer it was trained with (`tokenizer`: a spec for checkpoints that record none);
    returns the names of the files written."""
    from safetensors.numpy import save_file
    directory = checkpoint.resolve_dir(ckpt)
    if os.path.isdir(out) and any(f.endswith(".safetensors") for f in os.listdir(out)):
        raise ConversionError(f"--out={out} already holds safetensors files (stale shards "
                              "would mix with the new ones); pick an empty directory")
    meta = checkpoint.read_meta(directory, step)
    config = checkpoint.config_from_meta(meta)
    dtype = dtype or meta.get("hf", {}).get("dtype", "float32")
    if dtype not in HF_DTYPES:
        raise ConversionError(f"--dtype={dtype!r}: choose one of {sorted(HF_DTYPES)}")
    cfg = ModelConfig.from_config(config.model)
    hf_tok, tok_ids = hf_tokenizer(directory, meta, tokenizer)  # any error before writing
    if hf_tok is not None and hf_tok.get_vocab_size() > cfg.padded_vocab_size:
        raise ConversionError(
            f"the tokenizer has {hf_tok.get_vocab_size()} tokens but the model "
            f"{cfg.padded_vocab_size} embedding rows; pass the --tokenizer it was trained with")
    mesh = sharding.inference_mesh()
    params = checkpoint.load_params(directory, cfg, mesh, meta["step"])
    os.makedirs(out, exist_ok=True)

    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            tmp = os.path.join(out, f".shard-{len(shards)}.safetensors")
            save_file(current, tmp, metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for name, x in to_hf_state_dict(params, cfg):
        x = x.astype(HF_DTYPES[dtype])
        if size and size + x.nbytes > max_shard_bytes:
            flush()
        current[name] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    weight_map, written = {}, []
    for i, (tmp, names) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, os.path.join(out, fname))
        weight_map.update({n: fname for n in names})
        written.append(fname)
    _write_json(os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    ids = _token_ids(meta, token_ids or {}, tok_ids)
    _write_json(os.path.join(out, "config.json"), hf_config_from_model(config.model, ids, dtype))
    _write_json(os.path.join(out, "generation_config.json"),
                {k: v for k, v in ids.items() if v is not None})
    written += ["model.safetensors.index.json", "config.json", "generation_config.json"]
    if hf_tok is None:
        return written + _copy_tokenizer_files(directory, out)
    return written + _write_tokenizer(hf_tok, ids, out, config.model.max_seq_len)


def hf_tokenizer(directory: str, meta: dict, spec: str | None = None):
    """(tokenizers.Tokenizer, bos/eos/pad ids) of the tokenizer a checkpoint was trained
    with (or of `spec`), converted so transformers encodes exactly as training did; (None,
    {}) when it records none."""
    from olmo2_jax.data import tokenizer as tok_lib
    if spec:
        record, data = checkpoint.tokenizer_record(spec)
    else:
        record = checkpoint.recorded_tokenizer(directory, meta)
        if record is None:
            return None, {}
        data = checkpoint.tokenizer_data(directory, record)
    ours = checkpoint.tokenizer_from_record(record, data)
    bos = None
    try:
        if record["kind"] == "dolma2":
            hf, bos = tok_lib.dolma2_hf_tokenizer(), ours.eos_id  # as OLMo 2's releases
        elif record["kind"] == "sentencepiece":
            import sentencepiece as spm
            hf = tok_lib.sentencepiece_hf_tokenizer(data)
            bos = spm.SentencePieceProcessor(model_proto=data).bos_id()
        else:
            from tokenizers import Tokenizer
            hf = Tokenizer.from_str(data.decode("utf-8"))
    except ValueError as e:
        raise ConversionError(f"checkpoint {directory}: its {record['kind']} tokenizer cannot "
                              f"be written for transformers: {e}") from e
    return hf, {"bos_token_id": bos if bos is not None and bos >= 0 else None,
                "eos_token_id": ours.eos_id, "pad_token_id": ours.pad_id}


def _write_tokenizer(hf, ids: dict, out: str, max_len: int) -> list[str]:
    """tokenizer.json plus the configs AutoTokenizer reads (special tokens by name)."""
    hf.save(os.path.join(out, "tokenizer.json"))
    special = {f"{k}_token": hf.id_to_token(ids[f"{k}_token_id"]) for k in ("bos", "eos", "pad")
               if ids.get(f"{k}_token_id") is not None}
    if getattr(hf.model, "unk_token", None):
        special["unk_token"] = hf.model.unk_token
    _write_json(os.path.join(out, "special_tokens_map.json"), special)
    _write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len})
    return ["tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"]


def _copy_tokenizer_files(directory: str, out: str) -> list[str]:
    """Copies the tokenizer files `from_hf` kept from its source folder (none: [])."""
    files = [f for f in checkpoint.tokenizer_files(directory)
             if os.path.basename(f) != checkpoint.TOKENIZER_RECORD]
    for f in files:
        shutil.copy(f, os.path.join(out, os.path.basename(f)))
    return [os.path.basename(f) for f in files]


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv=None) -> None:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    f = flags.FlagValues()
    flags.DEFINE_string("hf_dir", None, "from_hf: a transformers Olmo2ForCausalLM folder.",
                        flag_values=f)
    config_flags.DEFINE_config_file("config", None, "from_hf: a configs/*.py for everything but "
                                    "the model shape (which comes from config.json).",
                                    flag_values=f, lock_config=False, sys_argv=argv)
    flags.DEFINE_string("ckpt", None, "to_hf: an olmo2_jax checkpoint dir (or workdir).",
                        flag_values=f)
    flags.DEFINE_integer("step", None, "to_hf: checkpoint step; default the latest.",
                         flag_values=f)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=f)
    flags.DEFINE_string("dtype", None, "to_hf: float32 / bfloat16 / float16; default the "
                        "source's dtype for converted checkpoints, else float32.", flag_values=f)
    flags.DEFINE_integer("max_shard_mb", 5 * 1024, "to_hf: safetensors shard size.",
                         flag_values=f)
    flags.DEFINE_string("tokenizer", None, "to_hf: tokenizer spec (dolma2, sentencepiece:"
                        "<file.model>, hf:<tokenizer.json>) for a checkpoint that records none; "
                        "overrides the recorded one.", flag_values=f)
    for k in ("bos", "eos", "pad"):
        flags.DEFINE_integer(f"{k}_token_id", None, f"to_hf: {k} id for config.json (default "
                             "from the source HF config, if any).", flag_values=f)
    given = argv
    try:
        argv = f(given)
        if f["config"].value is not None:
            f.config.get("stage")  # ml_collections defers a config file's load error to here
    except flags.Error as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    except Exception as e:  # noqa: BLE001 - whatever the --config file raised
        path = next((a.split("=", 1)[1] for a in given if a.startswith("--config=")), "?")
        sys.exit(f"error: --config={path}: " + ("no such file" if not os.path.isfile(
            path.split(":")[0]) else f"loading it raised {checkpoint.brief(e)}"))
    # Bad input, a damaged checkpoint (CheckpointError) or a full disk: one line on stderr.
    checkpoint.run_cli("convert", lambda: _main(f, argv),
                       expected=(ConversionError, config_lib.ConfigError, FileNotFoundError,
                                 ValueError), out=f.out)


def _main(f, argv) -> None:
    usage = "usage: python -m olmo2_jax.convert from_hf|to_hf --help"
    if len(argv) != 2 or argv[1] not in ("from_hf", "to_hf"):
        raise ConversionError(f"{usage} (got {argv[1:]})")
    if not f.out:
        raise ConversionError("--out is required")
    if argv[1] == "from_hf":
        if not f.hf_dir:
            raise ConversionError("from_hf needs --hf_dir")
        out = from_hf(f.hf_dir, f.out, f.config)
        print(json.dumps({"checkpoint": out, "step": 0}))
        return
    if not f.ckpt:
        raise ConversionError("to_hf needs --ckpt")
    ids = {f"{k}_token_id": f[f"{k}_token_id"].value for k in ("bos", "eos", "pad")}
    files = to_hf(f.ckpt, f.out, step=f.step, dtype=f.dtype,
                  max_shard_bytes=f.max_shard_mb * 2**20, token_ids=ids, tokenizer=f.tokenizer)
    note = None if any(n.startswith("tokenizer") for n in files) else (
        "no tokenizer files written: the checkpoint holds no tokenizer (it predates "
        "tokenizer records, or its run or HF source named none); "
        f"{checkpoint.NO_TOKENIZER_FIX}")
    print(json.dumps({"out": os.path.abspath(f.out), "files": files, "note": note}))


if __name__ == "__main__":
    main()
