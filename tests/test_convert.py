"""HF <-> olmo2_jax conversion, proven by logits against the public transformers Olmo2."""

import json
import os
import re

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
    from tokenizers import Tokenizer  # the real vocab: the size of the folder's tokenizer.json
    tok_size = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).get_vocab_size()
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (tok_size, 512) and tok_size < 512
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
                   vocab_size=checkpoint.read_meta(ckpt)["config"]["model"]["vocab_size"],
                   padded_vocab_size=512, rope_theta=10_000.0)
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


# --- The tokenizer a checkpoint was trained with, kept in it and written out by to_hf.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIED = ["def f(x):\n\tif x:  # naïve ✓ 日本語 🙂\r\n        return  x\n\n",
          "   leading spaces, trailing   \n\n\n", "Numbers 1234567 and 3.14159; I'm sure they'll"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/tiny.py (the embedded corpus, tokenized by its own sentencepiece model) at toy
    width for 2 steps, with the corpus cache in a temporary folder."""
    import runpy
    from olmo2_jax import train
    tmp = tmp_path_factory.mktemp("tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("OLMO2_JAX_CACHE", str(tmp / "cache"))
    c = runpy.run_path(os.path.join(REPO, "configs/tiny.py"))["get_config"]()
    c.model.update(vocab_size=512, padded_vocab_size=512, d_model=32, n_layers=2, n_heads=4,
                   n_kv_heads=2, mlp_hidden=64, max_seq_len=32)
    c.data.update(corpus_vocab_size=512, seq_len=32)
    c.train.update(steps=2, global_batch_size=8, log_every=1)
    c.optim.update(warmup_steps=1)
    c.checkpoint.update(every_steps=2, async_save=False)
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    train.train(c, str(tmp / "run"))
    yield tmp
    mp.undo()


def _generate(argv, capsys):
    from olmo2_jax import generate
    capsys.readouterr()
    generate.main(["generate", *argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tiny_run_keeps_its_tokenizer_and_converts(tiny_run, tmp_path, capsys):
    """The embedded-corpus run records its sentencepiece model (not config.data.tokenizer's
    'dolma2'); a copy of the run generates from text with the corpus cache gone, and to_hf
    writes a tokenizer transformers loads and encodes with exactly as training did."""
    import shutil
    from olmo2_jax.data import corpus
    files = corpus.prepare_default_corpus(str(tiny_run / "cache"), 512)
    meta = checkpoint.read_meta(str(tiny_run / "run" / "checkpoints"))
    assert meta["config"]["data"]["tokenizer"] == "dolma2"  # the config as given ...
    record = meta["tokenizer"]  # ... and what was used
    assert (record["kind"], record["file"], record["vocab_size"]) == (
        "sentencepiece", "tokenizer.model", 512)
    kept = tiny_run / "run" / "checkpoints" / "tokenizer"
    assert (kept / "tokenizer.model").read_bytes() == open(files.tokenizer_path, "rb").read()
    assert json.loads((kept / checkpoint.TOKENIZER_RECORD).read_text()) == record

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_run / "run", moved)
    shutil.rmtree(tiny_run / "cache")
    line = _generate([f"--ckpt={moved}", "--prompt=def main(", "--max_new_tokens=6"], capsys)
    assert 1 <= len(line["tokens"]) <= 6 and isinstance(line["text"], str)

    out = str(tmp_path / "hf")
    convert.to_hf(str(moved), out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = checkpoint.load_tokenizer(str(moved / "checkpoints"), meta)
    for text in VARIED:
        assert tok(text)["input_ids"] == ours.encode(text)
        assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 0, None)
    hf = json.load(open(os.path.join(out, "config.json")))
    assert (hf["eos_token_id"], hf["pad_token_id"], hf["vocab_size"]) == (2, 0, 512)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen == {"eos_token_id": 2, "pad_token_id": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == 2


def chain_checkpoint(directory, vocab, padded, chain, record=None, data=None):
    """A checkpoint whose greedy continuation of chain[0] is chain[1:] and then repeats
    chain[-1]'s successor: the blocks add nothing (zero output projections), token chain[k]
    embeds as the k-th unit vector and the LM head maps it to chain[k+1]."""
    from flax import linen as nn
    from olmo2_jax import config as config_lib
    from olmo2_jax.model import ModelConfig
    c = config_lib.base_config()
    c.model.update(vocab_size=vocab, padded_vocab_size=padded, d_model=16, n_layers=1,
                   n_heads=2, n_kv_heads=1, mlp_hidden=32, max_seq_len=64, dtype="float32")
    cfg = ModelConfig.from_config(c.model)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 4), jnp.int32)))["params"]
    layers = params["layers"]
    layers["attn"]["o_proj"] = jnp.zeros_like(layers["attn"]["o_proj"])
    layers["mlp"]["down_proj"] = jnp.zeros_like(layers["mlp"]["down_proj"])
    emb, head = params["embedding"], jnp.zeros_like(params["lm_head"])
    for k, (a, b) in enumerate(zip(chain, chain[1:])):
        emb = emb.at[a].set(jnp.eye(16)[k])
        head = head.at[k, b].set(1.0)
    params.update(embedding=emb, lm_head=head)
    meta = {"config": c.to_dict()}
    if record is not None:
        checkpoint.keep_tokenizer(directory, record, data)
        meta["tokenizer"] = record
    return checkpoint.write_params(directory, params, meta, step=3)


def byte_level_tokenizer_json(path):
    """A small byte-level BPE tokenizer.json (what `hf:` specs load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.mark.parametrize("kind", ["dolma2", "sentencepiece", "hf"])
def test_to_hf_generation_stops_at_eos(kind, tiny_run, tmp_path, capsys):
    """to_hf of a dolma2, a sentencepiece and a tokenizer.json checkpoint: AutoTokenizer and
    AutoModelForCausalLM load the folder, HF greedy generation stops at the tokenizer's EOS
    (config.json / generation_config.json carry it), as ours does."""
    if kind == "dolma2":
        spec, vocab, padded, prompt = "dolma2", 100_278, 100_352, "Hello world!"
    elif kind == "sentencepiece":
        spec = f"sentencepiece:{tiny_run / 'run' / 'checkpoints' / 'tokenizer' / 'tokenizer.model'}"
        vocab, padded, prompt = 512, 512, "import os\n"
    else:
        vocab = byte_level_tokenizer_json(tmp_path / "tokenizer.json")
        spec, padded, prompt = f"hf:{tmp_path / 'tokenizer.json'}", 384, "the quick fox"
    record, data = checkpoint.tokenizer_record(spec)
    ours = checkpoint.tokenizer_from_record(record, data)
    ids = ours.encode(prompt)
    assert len(set(ids)) == len(ids) >= 3 and ours.eos_id not in ids
    ckpt = chain_checkpoint(str(tmp_path / "ck"), vocab, padded, ids + [ours.eos_id],
                            record, data)
    line = _generate([f"--ckpt={ckpt}", f"--prompt_ids={ids[0]}", "--max_new_tokens=10"], capsys)
    assert line["tokens"] == ids[1:] + [ours.eos_id]  # our generate stops at EOS too

    out = str(tmp_path / "hf")
    files = convert.to_hf(ckpt, out)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(files)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in VARIED + [prompt]:
        assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.eos_token_id == ours.eos_id and tok.pad_token_id == ours.pad_id
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == ours.eos_id
    with torch.no_grad():
        new = model.generate(torch.tensor([ids[:1]]), max_new_tokens=10, do_sample=False)
    assert new[0, 1:].tolist() == ids[1:] + [ours.eos_id]  # stopped at EOS, not at 10
    assert tok.decode(new[0], skip_special_tokens=True) == prompt
    hf = json.load(open(os.path.join(out, "config.json")))
    assert (hf["vocab_size"], hf["unpadded_vocab_size"]) == (padded, vocab)


def test_vocab_size_survives_to_hf_and_back(tmp_path):
    """to_hf keeps the real vocab size beside the padded embedding rows; from_hf reads it
    back (or, for a folder without it, takes the size of its tokenizer.json)."""
    ckpt = chain_checkpoint(str(tmp_path / "ck"), 100_278, 100_352, [1, 2],
                            *checkpoint.tokenizer_record("dolma2"))
    convert.to_hf(ckpt, str(tmp_path / "hf"))
    back = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    model = checkpoint.read_meta(back)["config"]["model"]
    assert (model["vocab_size"], model["padded_vocab_size"]) == (100_278, 100_352)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    del cfg["unpadded_vocab_size"]  # a released OLMo 2 folder: derived from tokenizer.json
    json.dump(cfg, open(tmp_path / "hf" / "config.json", "w"))
    again = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "again"))
    assert checkpoint.read_meta(again)["config"]["model"]["vocab_size"] == 100_278


def test_checkpoint_without_tokenizer_names_the_fix(tmp_path, capsys):
    """Checkpoints written before tokenizers were recorded: generate --prompt and to_hf say
    to pass --tokenizer, which then works."""
    ckpt = chain_checkpoint(str(tmp_path / "old"), 100_278, 100_352, [9906, 1917, 100_257])
    with pytest.raises(SystemExit, match=r"holds no tokenizer .*--tokenizer=dolma2"):
        _generate([f"--ckpt={ckpt}", "--prompt=Hello"], capsys)
    line = _generate([f"--ckpt={ckpt}", "--prompt=Hello", "--tokenizer=dolma2"], capsys)
    assert line == {"tokens": [1917, 100_257], "text": " world"}
    capsys.readouterr()
    convert.main(["convert", "to_hf", f"--ckpt={ckpt}", f"--out={tmp_path / 'a'}"])
    note = json.loads(capsys.readouterr().out)["note"]
    assert "holds no tokenizer" in note and "--tokenizer=dolma2" in note
    files = convert.to_hf(ckpt, str(tmp_path / "b"), tokenizer="dolma2")
    assert "tokenizer.json" in files
    assert json.load(open(tmp_path / "b" / "generation_config.json"))["eos_token_id"] == 100_257


def test_kept_tokenizer_is_checked_and_never_overwritten(tiny_run, tmp_path):
    """A run into a directory that keeps another tokenizer is refused with nothing changed;
    a missing or altered tokenizer file is named with its fix; a soup carries the record."""
    from olmo2_jax import soup
    sp_spec = f"sentencepiece:{tiny_run / 'run' / 'checkpoints' / 'tokenizer' / 'tokenizer.model'}"
    d = str(tmp_path / "ck")
    ckpt = chain_checkpoint(d, 512, 512, [5, 6, 2], *checkpoint.tokenizer_record(sp_spec))
    before = {f: open(f, "rb").read() for f in checkpoint.tokenizer_files(d)}
    with pytest.raises(checkpoint.CheckpointError, match=r"keeps the tokenizer .*sentencepiece "
                       r"tokenizer.model .* not this run's \(dolma2\).*new --workdir"):
        checkpoint.keep_tokenizer(d, *checkpoint.tokenizer_record("dolma2"))
    assert {f: open(f, "rb").read() for f in checkpoint.tokenizer_files(d)} == before

    soup_dir = soup.soup([ckpt, ckpt], str(tmp_path / "soup"))
    meta = checkpoint.read_meta(soup_dir)
    assert meta["tokenizer"] == checkpoint.read_meta(d)["tokenizer"]
    assert checkpoint.load_tokenizer(soup_dir, meta).vocab_size == 512

    model = tmp_path / "ck" / "tokenizer" / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(checkpoint.CheckpointError, match="is not the tokenizer .* restore"):
        checkpoint.load_tokenizer(d, checkpoint.read_meta(d))
    model.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing: copy the checkpoint's "
                       "tokenizer/ folder along with its step directories"):
        convert.to_hf(d, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")  # refused before anything was written


def test_index_naming_a_tensor_its_shard_lacks_is_one_line(tmp_path):
    """A safetensors index naming a tensor that is not in the shard it names: one line
    naming the tensor, the shard and the fix (the CLI prints no traceback)."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "hf"
    tiny_hf_model().save_pretrained(str(d), max_shard_size="100KB")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = "model.layers.1.mlp.up_proj.weight"
    held, other = index["weight_map"][name], next(s for s in shards
                                                  if s != index["weight_map"][name])
    index["weight_map"][name] = other  # the index points at the wrong shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(convert.ConversionError, match=re.escape(
            f"names tensor {name} in {other}, which does not hold it; the tensor is in {held}: "
            "fix the index's weight_map")):
        convert.from_hf(str(d), str(tmp_path / "ck"))
    index["weight_map"][name] = held  # the index is right, the shard lost the tensor
    index_path.write_text(json.dumps(index))
    tensors = load_file(str(d / held))
    del tensors[name]
    save_file(tensors, str(d / held), metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        convert.main(["convert", "from_hf", f"--hf_dir={d}", f"--out={tmp_path / 'ck'}"])
    assert str(e.value.code) == (
        f"error: {index_path} names tensor {name} in {held}, which does not hold it; "
        "re-download or re-save the folder (save_pretrained)")
    assert not os.path.exists(tmp_path / "ck")
