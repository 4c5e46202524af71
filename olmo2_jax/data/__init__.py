"""Data: tokenizers, mixes, the n-gram filter, preparation, and the Grain pipeline."""

from olmo2_jax.data.corpus import CorpusFiles, prepare_default_corpus
from olmo2_jax.data.filters import find_repeated_ngram, has_repeated_ngram
from olmo2_jax.data.mixture import Source, read_mix
from olmo2_jax.data.pipeline import InstanceOptions, TokenWindows, make_dataset, make_iterator
from olmo2_jax.data.tokenizer import (SentencePieceTokenizer, TiktokenTokenizer, Tokenizer,
                                      load_tokenizer)

__all__ = [
    "CorpusFiles",
    "InstanceOptions",
    "SentencePieceTokenizer",
    "Source",
    "TiktokenTokenizer",
    "TokenWindows",
    "Tokenizer",
    "find_repeated_ngram",
    "has_repeated_ngram",
    "load_tokenizer",
    "make_dataset",
    "make_iterator",
    "prepare_default_corpus",
    "read_mix",
]
