"""Tokenize JSONL documents into the original implementation's raw uint32 token shards.

Lines are read in order and sent in chunks to worker processes, which parse the JSON,
tokenize the text field, append EOS and drop documents with a repeated n-gram run; the
main process writes the results back in input order, so the output is deterministic
whatever the number of workers. Shards (`part-00000.npy`, ...: raw little-endian
uint32, no header) end on document boundaries and hold at most `max_tokens_per_shard`
tokens unless a single document is longer. `manifest.json` is written last; it records
each shard's largest id (`max_id`), so the trainer checks ids against the model's vocab
without reading the shards.

Malformed lines (bad JSON, no text, bad UTF-8, a corrupt or truncated compressed file
from the line where decoding failed) are counted and reported as file:line; they never
stop the run. A write error (a full disk) removes the partial shard and stops with one
line naming the output folder.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import glob
import gzip
import io
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from olmo2_jax.data.filters import find_repeated_ngram
from olmo2_jax.data.tokenizer import Tokenizer, load_tokenizer

EMBEDDED = "embedded"  # --input: the embedded default corpus; --tokenizer: its sentencepiece
MANIFEST = "manifest.json"
_MAX_EXAMPLES = 100  # malformed-line examples, and dropped-document lines per reason
_CHUNK_BYTES = 1 << 22

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    tokenizer: str = "dolma2"
    text_field: str = "text"
    max_tokens_per_shard: int = 1 << 28  # 1 GiB of uint32
    ngram_max_period: int = 13
    ngram_min_repeats: int = 32  # 0 = keep every document
    workers: int = 0  # 0 = os.cpu_count()
    progress: bool = True


@dataclasses.dataclass
class Chunk:
    source: str  # file path, or "embedded"
    first_line: int  # 1-based line number of lines[0]
    lines: list  # raw bytes per JSONL line, or (name, text) for embedded documents
    error: str | None = None  # set on the last chunk of a file that could not be read on


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Files (sorted glob matches, in the order given); `embedded` passes through."""
    out = []
    for spec in (x.strip() for item in specs for x in item.split(",") if x.strip()):
        if spec == EMBEDDED:
            out.append(spec)
            continue
        matches = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"--input={spec!r} matches no file")
        bad = [m for m in matches if not m.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst",
                                                      ".json", ".json.gz", ".json.zst"))]
        if bad:
            raise ValueError(f"--input: {bad[0]!r} is not .jsonl, .jsonl.gz or .jsonl.zst")
        out.extend(matches)
    if not out:
        raise ValueError("--input names no file")
    return out


class _ZstdReader(io.RawIOBase):
    """Every frame of a .zst file. zstandard's stream_reader ends quietly where a truncated
    file stops; here a frame cut short raises EOFError and corrupt data an OSError."""

    def __init__(self, path: str):
        import zstandard

        self._file = open(path, "rb")
        self._dctx, self._error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame, self._fed = self._dctx.decompressobj(), False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._out):
            data = self._file.read(1 << 13)  # small: a corrupt block loses little before it
            if not data:
                if self._fed and not self._frame.eof:
                    raise EOFError("the compressed data ends inside a zstd frame "
                                   "(a truncated copy?)")
                return 0
            out = []
            while data:
                self._fed = True
                try:
                    out.append(self._frame.decompress(data))
                except self._error as e:
                    raise OSError(f"corrupt zstd data ({e})") from e
                if not self._frame.eof:
                    break
                data = self._frame.unused_data  # the next frame starts here
                self._frame, self._fed = self._dctx.decompressobj(), False
            self._out, self._pos = b"".join(out), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
        super().close()


def _open(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


def _chunks(paths: Sequence[str], embedded_max_bytes: int) -> Iterator[Chunk]:
    for path in paths:
        if path == EMBEDDED:
            from olmo2_jax.data import corpus

            docs = [(d.name, d.text) for d in corpus.default_documents(embedded_max_bytes)]
            for i in range(0, len(docs), 256):
                yield Chunk(EMBEDDED, i + 1, docs[i : i + 256])
            continue
        lines, size, first, lineno, offset = [], 0, 1, 0, 0
        try:
            with _open(path) as f:
                for lineno, line in enumerate(f, 1):
                    lines.append(line)
                    size += len(line)
                    offset += len(line)
                    if size >= _CHUNK_BYTES:
                        yield Chunk(path, first, lines)
                        lines, size, first = [], 0, lineno + 1
        except (OSError, EOFError, ValueError, zlib.error) as e:  # corrupt/truncated data
            yield Chunk(path, first, lines, error=f"unreadable after line {lineno} (byte "
                        f"{offset} of the decompressed text): {e}; the rest of it is skipped")
            continue
        if lines:
            yield Chunk(path, first, lines)


_WORKER: dict = {}


def _init_worker(options: Options) -> None:
    _WORKER["tokenizer"] = resolve_tokenizer(options.tokenizer)
    _WORKER["options"] = options


def _parse(chunk: Chunk, field: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """([(line, text)], [(line, why malformed)]); embedded documents count as lines."""
    texts, bad = [], []
    if chunk.source == EMBEDDED:
        return [(chunk.first_line + i, text) for i, (_, text) in enumerate(chunk.lines)], bad
    for i, raw in enumerate(chunk.lines):
        lineno = chunk.first_line + i
        if not raw.strip():
            bad.append((lineno, "blank line"))
            continue
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            bad.append((lineno, "invalid UTF-8"))
            continue
        except ValueError as e:
            bad.append((lineno, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(doc, dict):
            bad.append((lineno, f"not a JSON object ({type(doc).__name__})"))
        elif field not in doc:
            bad.append((lineno, f"no {field!r} field"))
        elif not isinstance(doc[field], str):
            bad.append((lineno, f"{field!r} is {type(doc[field]).__name__}, not a string"))
        else:
            texts.append((lineno, doc[field]))
    return texts, bad


def _process(chunk: Chunk) -> dict:
    tok: Tokenizer = _WORKER["tokenizer"]
    o: Options = _WORKER["options"]
    texts, bad = _parse(chunk, o.text_field)
    dropped = []  # (reason, line)
    kept = []
    for (lineno, _), ids in zip(texts, tok.encode_batch([t for _, t in texts])):
        if not ids:
            dropped.append(("empty", lineno))
            continue
        arr = np.asarray(ids, dtype="<u4")
        if o.ngram_min_repeats and find_repeated_ngram(arr, o.ngram_max_period,
                                                       o.ngram_min_repeats):
            dropped.append(("repeated_ngram", lineno))
            continue
        kept.append(np.append(arr, np.uint32(tok.eos_id)))
    tail_error = ([(chunk.source, chunk.first_line + len(chunk.lines), chunk.error)]
                  if chunk.error else [])
    return {
        "source": chunk.source,
        "docs": kept,
        "malformed": [(chunk.source, n, why) for n, why in bad] + tail_error,
        "unreadable": [f"{chunk.source}: {chunk.error}"] if chunk.error else [],
        "dropped": dropped,
        "lines": len(chunk.lines),
    }


def resolve_tokenizer(spec: str, embedded_vocab_size: int = 4096) -> Tokenizer:
    """`embedded` = the default corpus's sentencepiece model; otherwise a load_tokenizer spec."""
    if spec == EMBEDDED:
        from olmo2_jax.data import corpus

        files = corpus.prepare_default_corpus(vocab_size=embedded_vocab_size)
        spec = f"sentencepiece:{files.tokenizer_path}"
    return load_tokenizer(spec)


class OutputError(OSError):
    """Writing the output failed (a full disk); the message names the folder and the fix."""


def _output_error(output_dir: str, e: OSError, removed: str | None, complete: int) -> OutputError:
    code = errno.errorcode.get(e.errno or 0, "")
    what = ("the disk is full" if e.errno == errno.ENOSPC
            else "the disk quota is exceeded" if e.errno == errno.EDQUOT
            else f"{e.strerror or e}")
    left = (f"; removed the partial shard {removed}" if removed else "") + (
        f"; the {complete} complete shard(s) before it have no {MANIFEST}, so delete them"
        if complete else "")
    return OutputError(f"cannot write to --output_dir={output_dir}: {what} (OSError "
                       f"{code or e.errno}){left}. Free space (or choose another "
                       "--output_dir) and re-run into an empty --output_dir.")


class ShardWriter:
    """Appends documents to raw uint32 shards that end on document boundaries."""

    def __init__(self, output_dir: str, max_tokens: int):
        self.output_dir, self.max_tokens = output_dir, max_tokens
        self.shards: list[dict] = []
        self._file = None

    def _roll(self) -> None:
        self.close()
        name = f"part-{len(self.shards):05d}.npy"
        self._file = open(os.path.join(self.output_dir, name + ".tmp"), "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0, "max_id": 0})

    def write(self, doc: np.ndarray) -> None:
        cur = self.shards[-1] if self._file else None
        if cur is None or (cur["tokens"] and cur["tokens"] + len(doc) > self.max_tokens):
            self._roll()
            cur = self.shards[-1]
        self._file.write(doc.tobytes())
        cur["tokens"] += len(doc)
        cur["documents"] += 1
        cur["max_id"] = max(cur["max_id"], int(doc.max()))

    def abort(self) -> str | None:
        """After a write error: closes and removes the partial shard; returns its name."""
        if self._file is None:
            return None
        tmp = self._file.name
        with contextlib.suppress(OSError):  # flushing what is buffered fails the same way
            self._file.close()
        self._file = None
        self.shards.pop()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        return os.path.basename(tmp)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            tmp = self._file.name
            os.replace(tmp, tmp[: -len(".tmp")])
            self._file = None


def prepare(inputs: Sequence[str], output_dir: str, options: Options = Options(), *,
            embedded_max_bytes: int | None = None) -> dict:
    """Tokenizes `inputs` into `output_dir`; returns the manifest (also written there)."""
    from olmo2_jax.data import corpus

    t0 = time.perf_counter()
    paths = expand_inputs(inputs)
    if options.max_tokens_per_shard < 1:
        raise ValueError(f"--max_tokens_per_shard={options.max_tokens_per_shard} must be >= 1")
    tok = resolve_tokenizer(options.tokenizer)  # fails here, before any worker starts
    os.makedirs(output_dir, exist_ok=True)
    existing = glob.glob(os.path.join(glob.escape(output_dir), "part-*.npy"))
    if existing:
        raise FileExistsError(f"{output_dir} already holds token shards ({existing[0]}); "
                              "use an empty --output_dir")
    max_bytes = embedded_max_bytes or corpus.DEFAULT_MAX_BYTES
    workers = options.workers or os.cpu_count() or 1
    writer = ShardWriter(output_dir, options.max_tokens_per_shard)
    malformed, dropped, per_source = [], collections.Counter(), collections.Counter()
    dropped_lines: dict[str, list[str]] = {"repeated_ngram": [], "empty": []}
    unreadable: list[str] = []
    num_malformed, num_docs, num_lines = 0, 0, 0
    ctx = multiprocessing.get_context("spawn")  # no forked state (threads, file handles)
    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit=" lines", disable=not options.progress, smoothing=0.1)
    def consume(out: dict) -> None:
        nonlocal num_docs, num_malformed, num_lines
        with _writing(writer, output_dir):
            for doc in out["docs"]:
                writer.write(doc)
        num_docs += len(out["docs"])
        per_source[out["source"]] += len(out["docs"])
        for reason, line in out["dropped"]:
            dropped[reason] += 1
            if len(dropped_lines[reason]) < _MAX_EXAMPLES:
                dropped_lines[reason].append(f"{out['source']}:{line}")
        unreadable.extend(out["unreadable"])
        for source, line, why in out["malformed"]:
            num_malformed += 1
            if len(malformed) < _MAX_EXAMPLES:
                malformed.append(f"{source}:{line}: {why}")
                log.warning("skipped %s:%d: %s", source, line, why)
        num_lines += out["lines"]
        bar.update(out["lines"])

    # In-order results with a bounded number of chunks in flight (Pool.imap would read the
    # whole input ahead into memory when the workers are the bottleneck).
    with ctx.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(paths, max_bytes):
            pending.append(pool.apply_async(_process, (chunk,)))
            if len(pending) >= 2 * workers:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
    bar.close()
    with _writing(writer, output_dir):
        writer.close()
    manifest = {
        "format": "raw little-endian uint32, no header; EOS after every document",
        "dtype": "uint32",
        "tokenizer": options.tokenizer,
        "tokenizer_name": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "inputs": paths,
        "lines_read": num_lines,
        "documents": num_docs,
        "documents_per_input": dict(per_source),
        "tokens": sum(s["tokens"] for s in writer.shards),
        "dropped": {"repeated_ngram": dropped["repeated_ngram"], "empty": dropped["empty"]},
        "dropped_lines": dropped_lines,  # file:line, the first 100 per reason
        "ngram_filter": {"max_period": options.ngram_max_period,
                         "min_repeats": options.ngram_min_repeats},
        "malformed_lines": num_malformed,
        "malformed_examples": malformed,
        "unreadable_inputs": unreadable,
        "shards": writer.shards,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = os.path.join(output_dir, MANIFEST + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(output_dir, MANIFEST))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _output_error(output_dir, e, None, len(writer.shards)) from e
    return manifest


@contextlib.contextmanager
def _writing(writer: ShardWriter, output_dir: str):
    """An OSError while writing shards -> the partial shard removed, one OutputError."""
    try:
        yield
    except OSError as e:
        removed = writer.abort()
        raise _output_error(output_dir, e, removed, len(writer.shards)) from e
