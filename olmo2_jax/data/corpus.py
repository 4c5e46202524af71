"""The embedded default corpus: this Python's standard library, tokenized and cached.

With no data configured, training still needs real text that is on every machine and
that no one here wrote: the stdlib's `.py` sources plus the pydoc topic texts. A
deterministic ~8 MB subset, a sentencepiece BPE model trained on it, and the raw uint32
token stream (EOS after each document, the OLMo `.npy` layout without a header) are
built once per Python version and vocab size, then read from the cache.

Concurrency and crashes: every file is written under a temp name and `os.replace`d, and
`manifest.json` goes last, so a cache folder without a valid manifest is never used;
preparers serialize on an `fcntl.flock` over `.lock` in the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import pathlib
import platform
import secrets
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
import sentencepiece as spm

from olmo2_jax.data.tokenizer import SentencePieceTokenizer

CORPUS_VERSION = 1  # bump when the document selection or tokenizer training changes
DEFAULT_MAX_BYTES = 8 * 2**20
TOKENS_FILE = "tokens.npy"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2  # no BOS: OLMo 2 separates documents with EOS only
_TMP_MARK = ".tmp."
# Test suites, IDLE, third-party packages, build artefacts: not the library's own text.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
_SENTENCES_FOR_TOKENIZER = 300_000  # ~ every line of 8 MB; trains in ~2 s on 2 cores

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
    """Where a prepared corpus lives and how big it is."""

    tokens_path: str  # raw little-endian uint32, no header
    tokenizer_path: str  # sentencepiece .model
    num_tokens: int  # including one EOS per document
    num_documents: int


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document: a whole source file or one pydoc topic."""

    name: str  # stdlib-relative path, or "pydoc_data.topics:<key>"
    text: str


def _stdlib_candidates() -> list[tuple[str, str]]:
    """(name, absolute path) of every eligible stdlib `.py` file, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")
        ]
        for fn in filenames:
            # topics.py duplicates the topic texts added below; _sysconfigdata is per-build.
            if not fn.endswith(".py") or fn.startswith("_sysconfigdata") or fn == "topics.py":
                continue
            path = os.path.join(dirpath, fn)
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


def _rank(name: str) -> bytes:
    """A stable pseudo-random rank, so a budget samples the whole library, not A-C."""
    return hashlib.sha256(name.encode()).digest()


def default_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """The corpus documents, sorted by name: a deterministic subset of <= max_bytes UTF-8.

    Candidates are taken in hash-of-name order while they fit the budget, so the subset
    is spread over the library and fixed for a given Python installation.
    """
    from pydoc_data.topics import topics

    candidates: list[tuple[str, int, str | bytes]] = []  # (name, size, path or content)
    for name, path in _stdlib_candidates():
        candidates.append((name, os.path.getsize(path), path))
    for key in sorted(topics):
        data = topics[key].encode("utf-8")
        candidates.append((f"pydoc_data.topics:{key}", len(data), data))
    docs, used = [], 0
    for name, size, source in sorted(candidates, key=lambda c: _rank(c[0])):
        if size == 0 or used + size > max_bytes:
            continue
        try:
            data = pathlib.Path(source).read_bytes() if isinstance(source, str) else source
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # non-UTF-8 sources are rare (legacy fixtures): skip, never guess
        docs.append(Document(name, text))
        used += len(text.encode("utf-8"))
    return sorted(docs, key=lambda d: d.name)


def cache_root(cache_dir: str | None = None) -> str:
    """cache_dir, else $OLMO2_JAX_CACHE, else ~/.cache/olmo2_jax (also the token-id cache)."""
    if cache_dir:
        return cache_dir
    default = os.path.join(os.path.expanduser("~"), ".cache", "olmo2_jax")
    return os.environ.get("OLMO2_JAX_CACHE") or default


def corpus_dir(cache_dir: str | None, vocab_size: int, max_bytes: int) -> str:
    """The cache folder for one (Python, vocab size, budget, corpus version)."""
    py = f"{platform.python_implementation().lower()}{'.'.join(map(str, sys.version_info[:3]))}"
    name = f"stdlib-{py}-v{vocab_size}-b{max_bytes}-r{CORPUS_VERSION}"
    return os.path.join(cache_root(cache_dir), name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes via a temp file in the same folder; readers see the old file or the whole new one."""
    tmp = f"{path}{_TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    with open(os.path.join(folder, LOCK_FILE), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_manifest(folder: str) -> CorpusFiles | None:
    """The cached corpus if its manifest exists and the files it names are whole."""
    try:
        with open(os.path.join(folder, MANIFEST_FILE)) as f:
            m = json.load(f)
        tokens = os.path.join(folder, m["tokens_file"])
        tokenizer = os.path.join(folder, m["tokenizer_file"])
        if (
            m["corpus_version"] != CORPUS_VERSION
            or os.path.getsize(tokens) != 4 * m["num_tokens"]
            or os.path.getsize(tokenizer) != m["tokenizer_bytes"]
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CorpusFiles(tokens, tokenizer, int(m["num_tokens"]), int(m["num_documents"]))


def _train_tokenizer(docs: list[Document], vocab_size: int) -> bytes:
    """A byte-fallback BPE model that round-trips code exactly (identity normalization)."""
    lines = [line for d in docs for line in d.text.split("\n") if line.strip()]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # any text encodes, no <unk>
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=EOS_ID,
            user_defined_symbols=["\n"],  # lines are trained separately; newline is one token
            normalization_rule_name="identity",  # keep every character: decode(encode(x)) == x
            remove_extra_whitespaces=False,  # indentation is content in code
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # runs of indentation become single pieces
            split_digits=True,
            input_sentence_size=_SENTENCES_FOR_TOKENIZER,
            shuffle_input_sentence=True,
            num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"Training the default-corpus tokenizer with vocab_size={vocab_size} failed: {e} "
            "(byte_fallback needs 256 byte pieces plus one per character, so >= 512; a small "
            "max_bytes also caps how many pieces BPE can learn)."
        ) from e
    return buf.getvalue()


def _build(folder: str, vocab_size: int, max_bytes: int) -> CorpusFiles:
    t0 = time.perf_counter()
    docs = default_documents(max_bytes)
    if not docs:
        raise ValueError(f"No stdlib document fits max_bytes={max_bytes}.")
    proto = _train_tokenizer(docs, vocab_size)
    tok = SentencePieceTokenizer(proto)
    ids = tok.encode_batch([d.text for d in docs])
    num_tokens = sum(len(x) for x in ids) + len(docs)
    tokens = np.empty(num_tokens, dtype="<u4")
    pos = 0
    for x in ids:
        tokens[pos : pos + len(x)] = x
        tokens[pos + len(x)] = tok.eos_id
        pos += len(x) + 1

    _atomic_write(os.path.join(folder, TOKENIZER_FILE), lambda f: f.write(proto))
    _atomic_write(os.path.join(folder, TOKENS_FILE), lambda f: f.write(tokens.tobytes()))
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "python": sys.version,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "vocab_size": tok.vocab_size,
        "max_bytes": max_bytes,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokens_file": TOKENS_FILE,
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_bytes": len(proto),
        "num_tokens": num_tokens,
        "num_documents": len(docs),
        "num_text_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "documents": [d.name for d in docs],
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    _atomic_write(os.path.join(folder, MANIFEST_FILE), lambda f: f.write(manifest_bytes))
    log.info(
        "Prepared default corpus in %s: %d documents, %d tokens, %.1f s",
        folder, len(docs), num_tokens, time.perf_counter() - t0,
    )
    tokens_path = os.path.join(folder, TOKENS_FILE)
    return CorpusFiles(tokens_path, os.path.join(folder, TOKENIZER_FILE), num_tokens, len(docs))


def prepare_default_corpus(
    cache_dir: str | None = None, vocab_size: int = 4096, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> CorpusFiles:
    """Returns the cached default corpus, building it on first use (seconds).

    cache_dir defaults to $OLMO2_JAX_CACHE, else ~/.cache/olmo2_jax.
    """
    folder = corpus_dir(cache_dir, vocab_size, max_bytes)
    if (found := _load_manifest(folder)) is not None:
        return found
    os.makedirs(folder, exist_ok=True)
    with _locked(folder):
        if (found := _load_manifest(folder)) is not None:
            return found  # another process finished it while we waited
        # Nothing valid here: drop a stale manifest first so no reader trusts files we
        # are about to replace, then the temp files of killed runs (only lock holders write).
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, MANIFEST_FILE))
        for stale in glob.glob(os.path.join(glob.escape(folder), f"*{_TMP_MARK}*")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        return _build(folder, vocab_size, max_bytes)
