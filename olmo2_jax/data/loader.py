"""The training data that `config.data` names, resolved once: files, tokenizer, iterator.

`from_config` reads the mix file once and loads the tokenizer at most once (only where it is
needed: a mix's {TOKENIZER}, or the EOS id for document masking), checks the data (files
exist and are raw uint32, every token id < model.vocab_size: once per file, see
pipeline.check_token_files; the mix parses; the tokenizer fits the model's vocabulary) and
reports bad input as a ConfigError naming the key, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

from olmo2_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Resolved `config.data`: the token files and how to read them."""

    config: object  # the whole config (data, model.vocab_size, train.global_batch_size)
    paths: tuple[str, ...]  # every token file, all sources
    mix: dict = dataclasses.field(default_factory=dict)  # make_iterator's sources/weights/repeats
    eos_id: int | None = None  # for document masking
    # the tokenizer that made the token files (data/tokenizer.py spec): config.data.tokenizer,
    # or the embedded corpus's own sentencepiece model
    tokenizer_spec: str = ""

    def iterator(self, process_index: int = 0, process_count: int = 1):
        """The Grain iterator of this process's share of each batch."""
        from olmo2_jax.data import pipeline
        c, d = self.config, self.config.data
        instance = pipeline.InstanceOptions(
            eos_id=self.eos_id, document_masking=d.document_masking,
            ngram_max_period=d.ngram_max_period, ngram_min_repeats=d.ngram_min_repeats)
        try:
            return pipeline.make_iterator(
                None if self.mix else list(self.paths), seq_len=d.seq_len,
                global_batch_size=c.train.global_batch_size, seed=d.seed,
                process_index=process_index, process_count=process_count,
                num_workers=d.num_workers, vocab_size=c.model.vocab_size, instance=instance,
                **self.mix)
        except ValueError as e:
            raise ConfigError(f"config.data.{'mix' if d.mix else 'paths'}: {e}") from e


def from_config(config) -> TrainData:
    """Resolves config.data: a mix file, token file paths (globs), or, with neither, the
    embedded default corpus (prepared and cached on first use)."""
    d = config.data
    tokenizer = functools.cache(lambda: _tokenizer(config))
    if d.mix:
        sources = _mix_sources(config, tokenizer().name)
        mix = {"sources": sources}
        from olmo2_jax.data import mixture
        try:
            if d.weights:
                mix["weights"] = mixture.source_weights(sources, d.weights)
            if d.repeats:
                mix["repeats"] = mixture.source_repeats(sources, d.repeats)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        paths = tuple(p for s in sources for p in s.paths)
    elif d.paths:
        mix, paths = {}, tuple(_expand(d.paths))
    else:
        return _embedded(config)
    from olmo2_jax.data import pipeline
    try:  # before anything compiles: a bad id would only show as non-finite steps
        pipeline.check_token_files(paths, config.model.vocab_size)
    except ValueError as e:
        raise ConfigError(f"config.data.{'mix' if d.mix else 'paths'}: {e}") from e
    eos_id = tokenizer().eos_id if d.document_masking else None
    return TrainData(config, paths, mix, eos_id, d.tokenizer)


def _embedded(config) -> TrainData:
    from olmo2_jax.data import corpus
    if config.model.vocab_size != config.data.corpus_vocab_size:
        raise ConfigError(
            f"the embedded corpus has a {config.data.corpus_vocab_size}-token vocabulary but "
            f"config.model.vocab_size={config.model.vocab_size}; set "
            f"--config.model.vocab_size={config.data.corpus_vocab_size} "
            "(and padded_vocab_size), or point config.data.paths at your own token files")
    files = corpus.prepare_default_corpus(vocab_size=config.data.corpus_vocab_size)
    eos_id = corpus.EOS_ID if config.data.document_masking else None
    return TrainData(config, (files.tokens_path,), {}, eos_id,
                     f"sentencepiece:{files.tokenizer_path}")


def _expand(spec: str) -> list[str]:
    """Comma-separated files, globs and prepared folders (a folder = its shards)."""
    from olmo2_jax.data import mixture
    paths = []
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        found = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not found:
            raise FileNotFoundError(f"config.data.paths: {pattern!r} matches no file")
        for path in found:
            if os.path.isdir(path):
                try:
                    paths.extend(mixture.directory_files(path))
                except ValueError as e:
                    raise ConfigError(f"config.data.paths: {e}") from e
            else:
                paths.append(path)
    return paths


def _tokenizer(config):
    from olmo2_jax.data.tokenizer import load_tokenizer
    spec = config.data.tokenizer
    try:
        tok = load_tokenizer(spec)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config.data.tokenizer={spec!r}: {e}") from e
    if tok.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"config.data.tokenizer={spec!r} has {tok.vocab_size} tokens but "
            f"config.model.vocab_size={config.model.vocab_size}; raise the model's vocab_size")
    return tok


def _mix_sources(config, tokenizer_name: str):
    from olmo2_jax.data import mixture
    try:
        return mixture.read_mix(config.data.mix, tokenizer_id=tokenizer_name,
                                base=config.data.mix_base)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config.data.mix: {e}") from e
