"""Data: tokenizers, the embedded default corpus, and the Grain pipeline over token windows."""

from olmo2_jax.data.corpus import CorpusFiles, prepare_default_corpus
from olmo2_jax.data.pipeline import TokenWindows, make_dataset, make_iterator
from olmo2_jax.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "CorpusFiles",
    "SentencePieceTokenizer",
    "TokenWindows",
    "Tokenizer",
    "load_tokenizer",
    "make_dataset",
    "make_iterator",
    "prepare_default_corpus",
]
