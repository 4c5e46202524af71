"""Grain pipeline over fixed-length windows of raw uint32 token files (OLMo 2 stage 1).

Each file is a concatenation of EOS-separated documents; it is cut into non-overlapping
`seq_len` windows (tail dropped, no window crosses a file), shuffled globally per epoch,
repeated forever, strided across processes and batched. The iterator's state is a small
JSON dict, so a restart resumes the exact stream.

Several sources (a mix file's labels) are either concatenated, each repeated a given
number of times per epoch, and shuffled together (natural token shares, Dolmino-style
up-sampling), or each shuffled and repeated alone and interleaved at fixed weights.
Each instance then gets its loss zeroed if it holds a repeated n-gram run, and with
document masking, segment ids and positions that restart after every EOS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Sequence

import grain
import numpy as np

from olmo2_jax.data.filters import has_repeated_ngram
from olmo2_jax.data.mixture import Source, is_remote

_NPY_MAGIC = b"\x93NUMPY"
_TOKEN_DTYPE = np.dtype("<u4")
# Each open memmap holds a file descriptor; big mixes have thousands of files.
_MAX_OPEN_FILES = 128


class TokenWindows(grain.sources.RandomAccessDataSource):
    """Window i of the files' chunking as {"inputs", "targets", "loss_mask"}.

    targets are inputs shifted left by one; the last position has no next token in the
    window, so its target is 0 with loss_mask 0 (as OLMo's labels = input_ids[1:] + ignore).
    Files are validated when this is built, not on first read. The vocab check only reads
    each file's first and last window (a full scan of terabytes would stall startup).
    """

    def __init__(self, paths: Sequence[str], seq_len: int, *, vocab_size: int | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ValueError("No token files given: pass at least one raw uint32 token file.")
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (a window needs a next token).")
        self.paths = [os.fspath(p) for p in paths]
        self.seq_len = int(seq_len)
        self.num_tokens = [_check_token_file(p) for p in self.paths]
        self.windows_per_file = [n // self.seq_len for n in self.num_tokens]
        self._ends = np.cumsum(self.windows_per_file)  # window ids of file k end at _ends[k]
        if self._ends[-1] == 0:
            sizes = ", ".join(f"{p} ({n} tokens)" for p, n in zip(self.paths, self.num_tokens))
            raise ValueError(
                f"No full window of seq_len={self.seq_len} tokens in: {sizes}. "
                "Each file is chunked separately; use longer files or a shorter seq_len."
            )
        self._maps: dict[int, np.memmap] = {}
        self._lock = threading.Lock()
        if vocab_size is not None:
            self._check_vocab(vocab_size)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _memmap(self, file_index: int) -> np.memmap:
        mm = self._maps.get(file_index)
        if mm is None:
            with self._lock:  # grain reads from several threads
                mm = self._maps.get(file_index)
                if mm is None:
                    if len(self._maps) >= _MAX_OPEN_FILES:  # readers keep their own reference
                        self._maps.pop(next(iter(self._maps)))
                    mm = np.memmap(self.paths[file_index], dtype=_TOKEN_DTYPE, mode="r")
                    self._maps[file_index] = mm
        return mm

    def _raw(self, index: int) -> np.ndarray:
        """The uint32 tokens of window `index` (a memmap view)."""
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range [0, {len(self)}).")
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = (index - (int(self._ends[k - 1]) if k else 0)) * self.seq_len
        if is_remote(self.paths[k]):
            return _read_range(self.paths[k], start, self.seq_len)
        return self._memmap(k)[start : start + self.seq_len]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        inputs = np.asarray(self._raw(int(index)), dtype=np.int32)
        targets = np.zeros_like(inputs)
        targets[:-1] = inputs[1:]
        loss_mask = np.ones(self.seq_len, dtype=np.float32)
        loss_mask[-1] = 0.0
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}

    def _check_vocab(self, vocab_size: int) -> None:
        first = 0
        for path, n in zip(self.paths, self.windows_per_file):
            for local in {0, n - 1} if n else ():
                ids = self._raw(first + local)
                if int(ids.max()) >= vocab_size:
                    bad = int(np.argmax(ids >= vocab_size))
                    pos = local * self.seq_len + bad
                    raise ValueError(
                        f"{path}: token {int(ids[bad])} at position {pos} is >= "
                        f"vocab_size={vocab_size}. The file was tokenized with another "
                        "tokenizer, or model.vocab_size is too small."
                    )
            first += n

    def __getstate__(self) -> dict:
        # Memmaps and locks do not pickle; grain workers reopen the files lazily.
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        first = self.paths[0] + (f" and {len(self.paths) - 1} more" if len(self.paths) > 1 else "")
        return f"TokenWindows({first!r}, seq_len={self.seq_len}, windows={len(self)})"


def _read_range(path: str, start: int, count: int) -> np.ndarray:
    """`count` tokens from token `start` of a remote (gs://...) file: one ranged read."""
    from etils import epath

    itemsize = _TOKEN_DTYPE.itemsize
    with epath.Path(path).open("rb") as f:
        f.seek(start * itemsize)
        data = f.read(count * itemsize)
    return np.frombuffer(data, dtype=_TOKEN_DTYPE)


def _check_token_file(path: str) -> int:
    """Number of tokens in a raw uint32 file; clear errors for what is not one."""
    if is_remote(path):
        from etils import epath

        remote = epath.Path(path)
        if not remote.exists():
            raise FileNotFoundError(f"Token file not found: {path!r}. Check data.mix_base / "
                                    "the mix file, and that the bucket is readable.")
        size = remote.stat().length
        with remote.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"Token file not found: {path!r}. Check data.paths, or leave it empty for the "
            "default corpus."
        )
    else:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        raise ValueError(
            f"{path} has a NumPy .npy header; token files are raw uint32 with no header "
            "(OLMo layout). Rewrite it with array.astype('<u4').tofile(path)."
        )
    if size % _TOKEN_DTYPE.itemsize:
        raise ValueError(
            f"{path} is {size} bytes, not a multiple of 4, so it is not a raw uint32 token file "
            "(another dtype, or a truncated copy?). Re-tokenize or re-copy it."
        )
    return size // _TOKEN_DTYPE.itemsize


def _shuffle_seed(seed: int, label: str = "") -> int:
    """Mixes the seed: grain seeds epoch e with seed + e (seed 1's epoch 0 = seed 0's epoch 1)."""
    name = f"{seed}" + (f":{label}" if label else "")
    digest = hashlib.sha256(f"olmo2_jax.data.shuffle:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclasses.dataclass(frozen=True)
class InstanceOptions:
    """What is added to each window: the n-gram loss mask and document masking."""

    eos_id: int | None = None  # needed for document masking
    document_masking: bool = False
    ngram_max_period: int = 13
    ngram_min_repeats: int = 32  # 0 turns the load-time filter off

    def __post_init__(self):
        if self.document_masking and self.eos_id is None:
            raise ValueError("document masking needs the EOS id of the tokenizer")
        if self.ngram_min_repeats and (self.ngram_min_repeats < 2 or self.ngram_max_period < 1):
            raise ValueError(f"ngram_min_repeats={self.ngram_min_repeats} must be 0 (off) or "
                             f">= 2, ngram_max_period={self.ngram_max_period} >= 1")


def document_segments(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions): a document ends with its EOS; the next one starts at 0."""
    after_eos = np.empty(tokens.shape[0], dtype=bool)
    after_eos[0] = True
    after_eos[1:] = tokens[:-1] == eos_id
    segment_ids = np.cumsum(after_eos, dtype=np.int32) - 1
    starts = np.flatnonzero(after_eos).astype(np.int32)
    positions = np.arange(tokens.shape[0], dtype=np.int32) - starts[segment_ids]
    return segment_ids, positions


class FinishInstance(grain.transforms.Map):
    """Adds the repeated n-gram loss mask and, optionally, segment ids and positions."""

    def __init__(self, options: InstanceOptions):
        self.options = options

    def map(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        o = self.options
        inputs = example["inputs"]
        if o.ngram_min_repeats and has_repeated_ngram(inputs, o.ngram_max_period,
                                                      o.ngram_min_repeats):
            example["loss_mask"] = np.zeros_like(example["loss_mask"])
        if o.document_masking:
            example["segment_ids"], example["positions"] = document_segments(inputs, o.eos_id)
        return example


def _natural_mix(windows: list[TokenWindows], repeats: Sequence[float], seed: int,
                 labels: Sequence[str]) -> grain.MapDataset:
    """One epoch = every source's windows `repeat` times (fractions: a seeded subset)."""
    parts = []
    for source, repeat, label in zip(windows, repeats, labels):
        ds = grain.MapDataset.source(source)
        whole, fraction = int(repeat), repeat - int(repeat)
        if whole:
            parts.append(ds.repeat(whole) if whole > 1 else ds)
        extra = int(round(fraction * len(source)))
        if extra:
            parts.append(ds.shuffle(seed=_shuffle_seed(seed, f"subset:{label}"))[:extra])
    if not parts:
        raise ValueError("config.data.repeats leaves no data: every source is repeated 0 times")
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _ensure_absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags; outside `app.run` they are unparsed and it raises."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    paths: Sequence[str] | None = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    vocab_size: int | None = None,
    read_threads: int = 4,
    prefetch_buffer_size: int = 4,
    sources: Sequence[Source] | None = None,
    weights: Sequence[float] | None = None,
    repeats: Sequence[float] | None = None,
    instance: InstanceOptions | None = None,
) -> grain.IterDataset:
    """Infinite per-process batches: dicts of [global_batch_size // process_count, seq_len].

    The global stream is the same on every process (shuffle by seed, a new permutation
    each epoch); process p takes elements p, p + P, ... of it, so processes read disjoint
    windows and together make up each global batch in order. `paths` is one source;
    `sources` with `weights` are interleaved at those shares, with `repeats` (or neither)
    concatenated at natural token counts.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    if (paths is None) == (sources is None):
        raise ValueError("give either paths (one source) or sources (a mix), not both")
    if weights is not None and repeats is not None:
        raise ValueError("weights (fixed shares) and repeats (natural shares, up-sampled) "
                         "exclude each other; set one")
    if sources is None:
        sources = [Source("data", tuple(paths))]
    labels = [s.label for s in sources]
    for key, values in (("weights", weights), ("repeats", repeats)):
        if values is not None and len(values) != len(sources):
            raise ValueError(f"{len(values)} {key} for {len(sources)} sources {labels}")
    windows = []
    for s in sources:
        try:
            windows.append(TokenWindows(s.paths, seq_len, vocab_size=vocab_size))
        except ValueError as e:
            raise ValueError(f"source {s.label!r}: {e}") from e
    if weights is not None:
        keep = [i for i, w in enumerate(weights) if w > 0]
        if not keep:
            raise ValueError(f"all weights are 0 for sources {labels}")
        parts = [grain.MapDataset.source(windows[i]).shuffle(
            seed=_shuffle_seed(seed, labels[i])).repeat() for i in keep]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
            parts, weights=[weights[i] for i in keep])
    else:
        epoch = _natural_mix(windows, repeats or [1.0] * len(windows), seed, labels)
        ds = epoch.shuffle(seed=_shuffle_seed(seed)).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(FinishInstance(instance or InstanceOptions()))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def make_iterator(paths: Sequence[str] | None = None, **kwargs) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: get_state()/set_state() resume it exactly; close() after use."""
    return iter(make_dataset(paths, **kwargs))
