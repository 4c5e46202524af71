"""Tokenizers behind one small interface, chosen by a `kind:path` spec string.

Training only needs ids, the EOS id that separates documents and a pad id; keeping
the interface that small lets tiktoken (dolma2) and HF tokenizer.json backends be
added later as one class and one `load_tokenizer` branch each.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

SPEC_FORMS = ("sentencepiece:<path to .model>",)


class Tokenizer(abc.ABC):
    """Text <-> ids. `encode` adds no BOS/EOS: callers place EOS between documents."""

    vocab_size: int
    eos_id: int
    pad_id: int

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


def load_tokenizer(spec: str) -> Tokenizer:
    """Builds a tokenizer from `kind:path`, e.g. `sentencepiece:/data/tok.model`."""
    kind, sep, path = spec.partition(":")
    accepted = f"accepted forms: {', '.join(SPEC_FORMS)}"
    if not sep or not path:
        raise ValueError(f"Tokenizer spec {spec!r} is not of the form kind:path; {accepted}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"Unknown tokenizer kind {kind!r} in spec {spec!r}; {accepted}")
