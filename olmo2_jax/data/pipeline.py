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

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
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
MANIFEST = "manifest.json"  # what prepare_data writes beside its shards
_HEAD_BYTES = 1 << 15  # read once per file: .npy header and the int64 pattern
_SCAN_TOKENS = 1 << 22  # 16 MiB per read when scanning a file for its largest id
_SCAN_THREADS = 8
# Max ids of scanned files, keyed by (path, size, mtime); files this big are also cached on
# disk (small ones rescan in milliseconds, and tests would litter the cache).
_MAX_IDS: dict[str, int] = {}
_MAX_ID_CACHE = "token_max_ids.json"
_CACHE_MIN_BYTES = 1 << 26
_CACHE_ENTRIES = 20_000

log = logging.getLogger(__name__)


class TokenWindows(grain.sources.RandomAccessDataSource):
    """Window i of the files' chunking as {"inputs", "targets", "loss_mask"}.

    targets are inputs shifted left by one; the last position has no next token in the
    window, so its target is 0 with loss_mask 0 (as OLMo's labels = input_ids[1:] + ignore).
    Files are validated when this is built, not on first read (`check_token_files`): with
    vocab_size, every token of every file is < vocab_size (one id past the vocabulary
    anywhere makes every step it lands in non-finite).
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
        self.num_tokens = check_token_files(self.paths, vocab_size)
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


def check_token_files(paths: Sequence[str], vocab_size: int | None = None) -> list[int]:
    """Token counts of raw uint32 token files; a clear ValueError (FileNotFoundError) naming
    the file and the fix for anything else: missing, a directory, a .npy header, a size or
    dtype its manifest.json contradicts, int64 ids, and with vocab_size any id >= it."""
    manifests: dict[str, dict] = {}
    counts = [_check_token_file(p, manifests) for p in paths]
    if vocab_size is not None:
        check_token_ids(paths, counts, vocab_size, manifests)
    return counts


def _check_token_file(path: str, manifests: dict | None = None) -> int:
    """Number of tokens in a raw uint32 file; clear errors for what is not one."""
    if is_remote(path):
        from etils import epath

        remote = epath.Path(path)
        if not remote.exists():
            raise FileNotFoundError(f"Token file not found: {path!r}. Check data.mix_base / "
                                    "the mix file, and that the bucket is readable.")
        size = remote.stat().length
        with remote.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    elif os.path.isdir(path):
        raise ValueError(
            f"{path} is a directory, not a token file: pass its token files, or set "
            "config.data.paths to the directory (its shards are then read from its "
            f"{MANIFEST}, else every *.npy in it).")
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"Token file not found: {path!r}. Check data.paths, or leave it empty for the "
            "default corpus."
        )
    else:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    if head.startswith(_NPY_MAGIC):
        raise ValueError(_npy_header_message(path, head))
    if size % _TOKEN_DTYPE.itemsize:
        raise ValueError(
            f"{path} is {size} bytes, not a multiple of 4, so it is not a raw uint32 token file "
            "(another dtype, or a truncated copy?). Re-tokenize or re-copy it."
        )
    entry = _manifest_entry(path, manifests if manifests is not None else {})
    if entry is not None:
        manifest, shard = entry
        if manifest.get("dtype", "uint32") != "uint32":
            raise ValueError(f"{path}: its {MANIFEST} says dtype {manifest['dtype']!r}; token "
                             "files are raw uint32. Re-run prepare_data.")
        want = int(shard["tokens"]) * _TOKEN_DTYPE.itemsize
        if size != want:
            why = ("exactly twice that: it looks like int64 ids, not the uint32 prepare_data writes"
                   if size == 2 * want else "a truncated or partial copy?" if size < want
                   else "the file was changed after prepare_data wrote it")
            raise ValueError(
                f"{path} is {size} bytes but the {MANIFEST} beside it lists {shard['tokens']} "
                f"uint32 tokens ({want} bytes): {why}. Re-copy the prepared directory, or "
                "re-run prepare_data into an empty --output_dir.")
    words = np.frombuffer(head[: len(head) // 8 * 8], dtype=_TOKEN_DTYPE)
    if words.size >= 32 and not words[1::2].any() and (
            np.count_nonzero(words[0::2]) >= words.size // 4):
        raise ValueError(
            f"{path} looks like int64 token ids, not the raw uint32 that prepare_data writes: "
            f"in its first {words.size * 4} bytes every second 4-byte word is 0 (read as uint32 "
            "it would train on interleaved zeros). Convert it once with "
            "np.fromfile(path, '<i8').astype('<u4').tofile(new_path), or re-run prepare_data.")
    return size // _TOKEN_DTYPE.itemsize


def _npy_header_message(path: str, head: bytes) -> str:
    what = "a NumPy .npy header"
    try:
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
        what = f"a NumPy .npy header (dtype {dtype}, shape {shape})"
        if dtype.kind not in "iu":
            return (f"{path} has {what}: {dtype} values are not token ids. Token files are raw "
                    "little-endian uint32 with no header; re-tokenize with prepare_data.")
    except Exception:  # an unreadable header: say what we know
        pass
    return (f"{path} has {what}; token files are raw little-endian uint32 with no header "
            "(what prepare_data writes, the OLMo layout). Rewrite it once with "
            "np.load(path).astype('<u4').tofile(new_path).")


def _manifest_entry(path: str, manifests: dict) -> tuple[dict, dict] | None:
    """(manifest, shard entry) when a prepare_data manifest.json beside `path` lists it."""
    folder = os.path.dirname(path)
    if folder not in manifests:
        manifests[folder] = read_manifest(folder) or {}
    manifest = manifests[folder]
    shard = manifest.get("_by_file", {}).get(os.path.basename(path))
    return (manifest, shard) if shard is not None else None


def read_manifest(folder: str) -> dict | None:
    """The prepare_data manifest.json of a folder (with "_by_file": shard entries by file
    name), or None where there is none or it is not one (the corpus cache has another)."""
    path = os.path.join(folder, MANIFEST)
    try:
        if is_remote(path):
            from etils import epath

            remote = epath.Path(path)
            if not remote.exists():
                return None
            text = remote.read_text()
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            return None
        manifest = json.loads(text)
        if not isinstance(manifest, dict) or "shards" not in manifest:
            return None  # another tool's manifest (the corpus cache writes one)
        manifest["_by_file"] = {s["file"]: s for s in manifest["shards"]
                                if isinstance(s["tokens"], int)}
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        log.warning("%s is not a readable prepare_data manifest (%s); the files beside it "
                    "are checked without it", path, e)
        return None
    return manifest


def _file_key(path: str) -> str:
    """Cache key: path, size and mtime, so a rewritten file is scanned again."""
    if is_remote(path):
        from etils import epath

        st = epath.Path(path).stat()
        return f"{path}|{st.length}|{st.mtime}"
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def check_token_ids(paths: Sequence[str], num_tokens: Sequence[int], vocab_size: int,
                    manifests: dict | None = None) -> None:
    """Every id of every file is < vocab_size, or a ValueError naming the first bad one.

    A file's largest id comes from the prepare_data manifest beside it (its size was
    checked against the manifest), else from a cache keyed by (path, size, mtime), else
    from one vectorised pass over the file (~0.2 s per GiB from the page cache; files in
    parallel threads).
    """
    manifests = {} if manifests is None else manifests
    todo: dict[str, str] = {}  # path -> cache key
    for path, n in zip(paths, num_tokens):
        if not n:
            continue
        entry = _manifest_entry(path, manifests)
        if entry is not None and "max_id" in entry[1]:
            top = int(entry[1]["max_id"])
        else:
            key = _file_key(path)
            top = _MAX_IDS.get(key, _disk_cache().get(key))
            if top is None:
                todo[path] = key
                continue
            _MAX_IDS[key] = top
        if top >= vocab_size:
            _raise_out_of_range(path, vocab_size, manifests)
    if not todo:
        return
    sizes = {p: n * _TOKEN_DTYPE.itemsize for p, n in zip(paths, num_tokens) if p in todo}
    gb = sum(sizes.values()) / 1e9
    remote = [p for p in todo if is_remote(p)]
    if remote:
        log.warning("%d gs:// token file(s) (first %s) have no %s with max_id beside them: "
                    "reading them through (%.2f GB) once to check every id < vocab_size=%d",
                    len(remote), remote[0], MANIFEST, sum(sizes[p] for p in remote) / 1e9,
                    vocab_size)
    if gb > 1:
        log.info("Checking every token id < vocab_size=%d in %d file(s), %.1f GB (once per "
                 "file; cached)", vocab_size, len(todo), gb)
    threads = min(_SCAN_THREADS, len(todo))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        tops = dict(zip(todo, pool.map(lambda p: _scan(p)[0], todo)))
    new = {}
    for path, key in todo.items():
        _MAX_IDS[key] = tops[path]
        if sizes[path] >= _CACHE_MIN_BYTES:
            new[key] = tops[path]
    if new:
        _save_disk_cache(new)
    for path in paths:
        if path in tops and tops[path] >= vocab_size:
            _raise_out_of_range(path, vocab_size, manifests)


def _scan(path: str, vocab_size: int | None = None) -> tuple[int, int | None, int | None]:
    """(largest id, position and value of the first id >= vocab_size: the scan stops there)."""
    buf = np.empty(_SCAN_TOKENS, dtype=_TOKEN_DTYPE)
    view = memoryview(buf).cast("B")
    top, pos = 0, 0
    if is_remote(path):
        from etils import epath

        f = epath.Path(path).open("rb")
    else:
        f = open(path, "rb", buffering=0)
    with f:
        while True:
            got = 0
            while got < len(view):
                if hasattr(f, "readinto"):
                    n = f.readinto(view[got:])
                else:  # some remote file objects only read()
                    data = f.read(len(view) - got)
                    n = len(data)
                    view[got : got + n] = data
                if not n:
                    break
                got += n
            ids = buf[: got // _TOKEN_DTYPE.itemsize]
            if not ids.size:
                return top, None, None
            top = max(top, int(ids.max()))
            if vocab_size is not None and top >= vocab_size:
                bad = int(np.argmax(ids >= vocab_size))
                return top, pos + bad, int(ids[bad])
            pos += ids.size


def _raise_out_of_range(path: str, vocab_size: int, manifests: dict):
    _, pos, value = _scan(path, vocab_size)
    if pos is None:  # a manifest's max_id that the file contradicts
        raise ValueError(f"{path}: the {MANIFEST} beside it says max_id >= vocab_size="
                         f"{vocab_size} but the file has no such id: the manifest is stale; "
                         "re-run prepare_data, or delete that manifest.json.")
    hint = ""
    entry = _manifest_entry(path, manifests)
    if entry is not None and "tokenizer" in entry[0]:
        m = entry[0]
        hint = (f" Its {MANIFEST} says it was prepared with --tokenizer={m['tokenizer']} "
                f"(vocab {m.get('vocab_size')}).")
    elif value > 0xFFFF and (value >> 16) < vocab_size and (value & 0xFFFF) < vocab_size:
        hint = " It reads as two uint16 ids: is the file uint16, not uint32?"
    raise ValueError(
        f"{path}: token id {value} at position {pos} is >= vocab_size={vocab_size} "
        f"(config.model.vocab_size), so the model has no embedding for it.{hint} The file was "
        "tokenized with another tokenizer (or is not raw uint32): set config.data.tokenizer "
        "and config.model.vocab_size (and padded_vocab_size) to the tokenizer that wrote it, "
        "or re-run prepare_data with the model's tokenizer.")


def _disk_cache() -> dict:
    """{cache key: max id} from $OLMO2_JAX_CACHE/token_max_ids.json, read once."""
    path = _disk_cache_path()
    if path not in _DISK:
        _DISK[path] = {}
        try:
            with open(path, encoding="utf-8") as f:
                _DISK[path] = dict(json.load(f)["max_ids"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return _DISK[path]


_DISK: dict[str, dict] = {}


def _disk_cache_path() -> str:
    from olmo2_jax.data.corpus import cache_root

    return os.path.join(cache_root(), _MAX_ID_CACHE)


def _save_disk_cache(new: dict) -> None:
    """Merge `new` into the JSON cache (atomic replace; the newest _CACHE_ENTRIES kept)."""
    path = _disk_cache_path()
    _DISK.pop(path, None)  # re-read: another process may have added entries
    merged = {**_disk_cache(), **new}
    merged = dict(list(merged.items())[-_CACHE_ENTRIES:])
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"max_ids": merged}, f)
        os.replace(tmp, path)
        _DISK[path] = merged
    except OSError as e:  # a read-only home: the check still ran, it is just not remembered
        log.info("could not cache token max ids in %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp)


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
