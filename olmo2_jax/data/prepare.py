"""Tokenize JSONL documents into the original implementation's raw uint32 token shards.

Lines are read in order and sent in chunks to worker processes, which parse the JSON,
tokenize the text field, append EOS and drop documents with a repeated n-gram run; the
main process writes the results back in input order, so the output is deterministic
whatever the number of workers. Shards (`part-00000.npy`, ...: raw little-endian
uint32, no header) end on document boundaries and hold at most `max_tokens_per_shard`
tokens unless a single document is longer. `manifest.json` is written last.

Malformed lines (bad JSON, no text, bad UTF-8, unreadable compressed tails) are
counted and reported as file:line; they never stop the run.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import io
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from olmo2_jax.data.filters import find_repeated_ngram
from olmo2_jax.data.tokenizer import Tokenizer, load_tokenizer

EMBEDDED = "embedded"  # --input: the embedded default corpus; --tokenizer: its sentencepiece
MANIFEST = "manifest.json"
_MAX_EXAMPLES = 100  # malformed-line examples kept in the manifest
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


def _open(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                            closefd=True))
    return open(path, "rb")


def _chunks(paths: Sequence[str], embedded_max_bytes: int) -> Iterator[Chunk]:
    for path in paths:
        if path == EMBEDDED:
            from olmo2_jax.data import corpus

            docs = [(d.name, d.text) for d in corpus.default_documents(embedded_max_bytes)]
            for i in range(0, len(docs), 256):
                yield Chunk(EMBEDDED, i + 1, docs[i : i + 256])
            continue
        lines, size, first, lineno = [], 0, 1, 0
        try:
            with _open(path) as f:
                for lineno, line in enumerate(f, 1):
                    lines.append(line)
                    size += len(line)
                    if size >= _CHUNK_BYTES:
                        yield Chunk(path, first, lines)
                        lines, size, first = [], 0, lineno + 1
        except (OSError, EOFError, ValueError) as e:  # truncated/corrupt compressed data
            yield Chunk(path, first, lines, error=f"unreadable after line {lineno}: {e}")
            continue
        if lines:
            yield Chunk(path, first, lines)


_WORKER: dict = {}


def _init_worker(options: Options) -> None:
    _WORKER["tokenizer"] = resolve_tokenizer(options.tokenizer)
    _WORKER["options"] = options


def _parse(chunk: Chunk, field: str) -> tuple[list[str], list[tuple[int, str]]]:
    texts, bad = [], []
    if chunk.source == EMBEDDED:
        return [text for _, text in chunk.lines], bad
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
            texts.append(doc[field])
    return texts, bad


def _process(chunk: Chunk) -> dict:
    tok: Tokenizer = _WORKER["tokenizer"]
    o: Options = _WORKER["options"]
    texts, bad = _parse(chunk, o.text_field)
    dropped = collections.Counter()
    kept = []
    for ids in tok.encode_batch(texts):
        if not ids:
            dropped["empty"] += 1
            continue
        arr = np.asarray(ids, dtype="<u4")
        if o.ngram_min_repeats and find_repeated_ngram(arr, o.ngram_max_period,
                                                       o.ngram_min_repeats):
            dropped["repeated_ngram"] += 1
            continue
        kept.append(np.append(arr, np.uint32(tok.eos_id)))
    tail_error = ([(chunk.source, chunk.first_line + len(chunk.lines), chunk.error)]
                  if chunk.error else [])
    return {
        "source": chunk.source,
        "docs": kept,
        "malformed": [(chunk.source, n, why) for n, why in bad] + tail_error,
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
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def write(self, doc: np.ndarray) -> None:
        cur = self.shards[-1] if self._file else None
        if cur is None or (cur["tokens"] and cur["tokens"] + len(doc) > self.max_tokens):
            self._roll()
            cur = self.shards[-1]
        self._file.write(doc.tobytes())
        cur["tokens"] += len(doc)
        cur["documents"] += 1

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
    num_malformed, num_docs, num_lines = 0, 0, 0
    ctx = multiprocessing.get_context("spawn")  # no forked state (threads, file handles)
    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit=" lines", disable=not options.progress, smoothing=0.1)
    def consume(out: dict) -> None:
        nonlocal num_docs, num_malformed, num_lines
        for doc in out["docs"]:
            writer.write(doc)
        num_docs += len(out["docs"])
        per_source[out["source"]] += len(out["docs"])
        dropped.update(out["dropped"])
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
    writer.close()
    manifest = {
        "format": "raw little-endian uint32, no header; EOS after every document",
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
        "ngram_filter": {"max_period": options.ngram_max_period,
                         "min_repeats": options.ngram_min_repeats},
        "malformed_lines": num_malformed,
        "malformed_examples": malformed,
        "shards": writer.shards,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = os.path.join(output_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, MANIFEST))
    return manifest
