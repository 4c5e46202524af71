"""HF <-> olmo2_jax conversion, proven by logits against the public transformers Olmo2."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo2_jax import checkpoint, convert, sharding
from olmo2_jax.model import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_hf_model(seed=0, **overrides):
    """A random transformers Olmo2 with GQA and non-trivial norm weights."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=None, eos_token_id=None,
              initializer_range=0.1)  # logits up to ~4: 1e-4 is a real bound
    kw.update(overrides)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**kw)).eval()
    with torch.no_grad():  # all-ones norms would hide a swapped or missing norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<pad>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf"))
    tiny_hf_model().save_pretrained(d, max_shard_size="100KB")  # several shards + index
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    return convert.from_hf(hf_dir, str(tmp_path_factory.mktemp("ck") / "ckpt"))


def load(ckpt_dir):
    meta = checkpoint.read_meta(ckpt_dir)
    cfg = checkpoint.model_config(meta)
    mesh = sharding.make_mesh(checkpoint.config_from_meta(meta))
    return cfg, checkpoint.load_params(ckpt_dir, cfg, mesh), mesh


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def test_hf_folder_is_sharded(hf_dir):
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]) > 1


def test_from_hf_logits_match_transformers(hf_dir, ckpt):
    cfg, params, mesh = load(ckpt)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 16, 10_000.0)
    assert cfg.dtype == jnp.bfloat16  # the config default; parity is checked in fp32 below
    f32 = cfg.__class__(**{**cfg.__dict__, "dtype": jnp.float32})
    tokens = np.random.default_rng(0).integers(0, 512, (3, 40))
    with jax.set_mesh(mesh):
        ours = np.asarray(jax.jit(Transformer(f32).apply)({"params": params}, tokens))
    ref = hf_logits(transformers.Olmo2ForCausalLM.from_pretrained(hf_dir).eval(), tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # The params come back sharded on the mesh (FSDP over the embed dim of the weights).
    assert params["layers"]["mlp"]["up_proj"].sharding.spec[1] == "fsdp"


def test_to_hf_roundtrip_is_exact(hf_dir, ckpt, tmp_path):
    out = str(tmp_path / "out")
    files = convert.to_hf(ckpt, out, max_shard_bytes=60_000)
    assert sum(f.endswith(".safetensors") for f in files) > 1
    original = transformers.Olmo2ForCausalLM.from_pretrained(hf_dir).eval()
    back = transformers.Olmo2ForCausalLM.from_pretrained(out).eval()
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tokens = np.random.default_rng(1).integers(0, 512, (2, 33))
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(original, tokens))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert json.load(open(os.path.join(out, "generation_config.json")))["pad_token_id"] == 0
    with pytest.raises(convert.ConversionError, match="already holds safetensors"):
        convert.to_hf(ckpt, out)


def test_to_hf_bfloat16_and_cli(ckpt, tmp_path):
    out = str(tmp_path / "bf16")
    with pytest.raises(SystemExit):  # absl flags: no subcommand
        convert.main(["convert", f"--ckpt={ckpt}", f"--out={out}"])
    convert.main(["convert", "to_hf", f"--ckpt={ckpt}", f"--out={out}", "--dtype=bfloat16"])
    back = transformers.Olmo2ForCausalLM.from_pretrained(out)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_from_training_checkpoint_of_unscanned_model(tmp_path):
    """to_hf reads a checkpoint of any stage (full TrainState, optimiser included) and
    unscanned (layers_{i}) params."""
    import optax
    from olmo2_jax import config as config_lib
    from olmo2_jax.model import ModelConfig
    from olmo2_jax.train import TrainState
    c = config_lib.base_config()
    c.model.update(vocab_size=500, padded_vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                   n_kv_heads=2, mlp_hidden=96, scan_layers=False, dtype="float32", remat="none")
    cfg = ModelConfig.from_config(c.model)
    model = Transformer(cfg)
    from flax import linen as nn
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    tx = optax.adamw(1e-3)
    state = TrainState(step=jnp.int32(7), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1))
    manager = checkpoint.make_manager(str(tmp_path / "work" / "checkpoints"), keep=1,
                                      async_save=False)
    checkpoint.save(manager, 7, state, None, {"config": c.to_dict(), "step": 7})
    manager.wait_until_finished()
    out = str(tmp_path / "hf")
    convert.to_hf(str(tmp_path / "work"), out)  # a workdir is accepted too
    hf = transformers.Olmo2ForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(2).integers(0, 500, (2, 16))
    ours = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def _folder(tmp_path, model, edit):
    from safetensors.numpy import save_file
    d = tmp_path / "bad"
    model.save_pretrained(str(d))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    edit(sd)
    os.remove(d / "model.safetensors")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     "missing (1): model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     "unexpected (1): model.layers.0.self_attn.q_proj.bias"),
    (lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64),
                                                                               np.float32)}),
     "mis-shaped (1): model.layers.0.self_attn.k_proj.weight: (64, 64) (expected (32, 64))"),
])
def test_bad_tensors_are_named(tmp_path, edit, message):
    d = _folder(tmp_path, tiny_hf_model(), edit)
    import re
    with pytest.raises(convert.ConversionError, match=re.escape(message)):
        convert.from_hf(d, str(tmp_path / "ck"))
    assert not os.path.exists(tmp_path / "ck")  # nothing written before the check


def test_bad_config_and_paths(tmp_path):
    d = tmp_path / "tied"
    tiny_hf_model(tie_word_embeddings=True).save_pretrained(str(d))
    with pytest.raises(convert.ConversionError, match="tie_word_embeddings"):
        convert.from_hf(str(d), str(tmp_path / "ck"))
    with pytest.raises(convert.ConversionError, match="no config.json"):
        convert.from_hf(str(tmp_path), str(tmp_path / "ck"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.to_hf(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_training_continues_from_converted_checkpoint(hf_dir, ckpt, tmp_path):
    """from_hf -> one training step at lr 0 (fresh optimiser) -> to_hf gives back the very
    same transformers weights; a mismatched model config is refused before compiling."""
    from olmo2_jax import config as config_lib
    from olmo2_jax import train
    from tests.test_train import small_config, token_file
    c = small_config(token_file(tmp_path / "tokens.bin"), steps=1)
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96,
                   vocab_size=512, padded_vocab_size=512, rope_theta=10_000.0)
    c.optim.update(lr=0.0, warmup_steps=0, schedule="constant")
    c.train.init_from = ckpt
    train.train(c, str(tmp_path / "run"))
    out = str(tmp_path / "hf")
    convert.to_hf(str(tmp_path / "run"), out)
    a = transformers.Olmo2ForCausalLM.from_pretrained(hf_dir).state_dict()
    b = transformers.Olmo2ForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c.model.mlp_hidden = 128
    with pytest.raises(config_lib.ConfigError, match=r"model.mlp_hidden=128 \(checkpoint: 96\)"):
        train.train(c, str(tmp_path / "run2"))


def test_cli_from_hf_with_config_and_generate_text(hf_dir, tmp_path, capsys):
    """--config supplies everything but the model shape; generate --prompt uses the
    tokenizer the checkpoint carries and prints one JSON line with the text."""
    from olmo2_jax import generate
    out = str(tmp_path / "ck")
    convert.main(["convert", "from_hf", f"--hf_dir={hf_dir}", f"--out={out}",
                  "--config=configs/tiny.py", "--config.train.steps=50"])
    meta = checkpoint.read_meta(out)
    assert meta["config"]["train"]["steps"] == 50 and meta["config"]["model"]["d_model"] == 64
    assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))
    capsys.readouterr()
    generate.main(["generate", f"--ckpt={out}", "--prompt=the quick fox", "--max_new_tokens=5"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["tokens"]) == 5 and isinstance(line["text"], str)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        convert.main(["convert", "from_hf", f"--hf_dir={hf_dir}", f"--out={out}"])


def test_bfloat16_folder_roundtrips_in_bfloat16(tmp_path):
    """A bf16 release is held as fp32 master weights (exact) and written back as bf16."""
    d = str(tmp_path / "bf16")
    tiny_hf_model(seed=5).to(torch.bfloat16).save_pretrained(d)
    ckpt = convert.from_hf(d, str(tmp_path / "ck"))
    assert checkpoint.read_meta(ckpt)["hf"]["dtype"] == "bfloat16"
    convert.to_hf(ckpt, str(tmp_path / "out"))
    a = transformers.Olmo2ForCausalLM.from_pretrained(d).state_dict()
    b = transformers.Olmo2ForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
