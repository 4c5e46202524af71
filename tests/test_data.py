"""Tokenizer, default corpus, token windows and the Grain pipeline (all CPU, seconds)."""

import json
import os
import pathlib
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from olmo2_jax.data import corpus, pipeline
from olmo2_jax.data.pipeline import TokenWindows, make_dataset, make_iterator
from olmo2_jax.data.tokenizer import SentencePieceTokenizer, load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL_BYTES = 300_000  # ~36 stdlib documents: the whole build takes well under a second
SMALL_VOCAB = 512


def write_tokens(path, tokens) -> str:
    np.asarray(tokens, dtype="<u4").tofile(path)
    return str(path)


def window_ids(batch, seq_len: int) -> list[int]:
    """Window index of each row, for files of arange tokens (window i starts at i * seq_len)."""
    return (batch["inputs"][:, 0] // seq_len).tolist()


# ---------------------------------------------------------------- corpus + tokenizer


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    files = corpus.prepare_default_corpus(str(cache), SMALL_VOCAB, max_bytes=SMALL_BYTES)
    return cache, files


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos_id)
    assert ends.size and ends[-1] == len(tokens) - 1, "the stream must end with EOS"
    return np.split(tokens, ends + 1)[:-1]


def test_default_documents_are_a_bounded_deterministic_stdlib_subset():
    docs = corpus.default_documents(SMALL_BYTES)
    assert docs == corpus.default_documents(SMALL_BYTES)
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert sum(len(d.text.encode()) for d in docs) <= SMALL_BYTES
    assert all(d.text for d in docs)
    full = corpus.default_documents()
    names = [d.name for d in full]
    assert sum(len(d.text.encode()) for d in full) <= corpus.DEFAULT_MAX_BYTES
    assert len(full) > 300 and any(n.startswith("pydoc_data.topics:") for n in names)
    excluded = {"test", "tests", "idlelib", "site-packages"}
    assert not any(excluded & set(n.split("/")) for n in names)


def test_corpus_tokens_decode_to_the_source_documents(small_corpus):
    _, files = small_corpus
    tok = SentencePieceTokenizer(files.tokenizer_path)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (SMALL_VOCAB, corpus.PAD_ID, corpus.EOS_ID)
    tokens = np.fromfile(files.tokens_path, dtype="<u4")
    assert len(tokens) == files.num_tokens and tokens.max() < tok.vocab_size
    docs = corpus.default_documents(SMALL_BYTES)
    pieces = split_documents(tokens, tok.eos_id)  # EOS after (and only after) each document
    assert len(pieces) == len(docs) == files.num_documents
    assert tok.decode(pieces[0][:-1]) == docs[0].text
    assert all(tok.decode(p[:-1]) == d.text for p, d in zip(pieces, docs))


def test_corpus_manifest_and_cache_reuse(small_corpus):
    cache, files = small_corpus
    folder = os.path.dirname(files.tokens_path)
    manifest = json.loads(pathlib.Path(folder, corpus.MANIFEST_FILE).read_text())
    assert manifest["num_tokens"] == files.num_tokens == os.path.getsize(files.tokens_path) // 4
    assert manifest["num_documents"] == files.num_documents == len(manifest["documents"])
    assert manifest["documents"] == [d.name for d in corpus.default_documents(SMALL_BYTES)]
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in os.path.basename(folder)
    before = os.stat(files.tokens_path)
    t0 = time.perf_counter()
    again = corpus.prepare_default_corpus(str(cache), SMALL_VOCAB, max_bytes=SMALL_BYTES)
    assert time.perf_counter() - t0 < 0.2
    assert again == files
    after = os.stat(files.tokens_path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_corpus_cache_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("OLMO2_JAX_CACHE", str(tmp_path))
    files = corpus.prepare_default_corpus(vocab_size=SMALL_VOCAB, max_bytes=100_000)
    assert files.tokens_path.startswith(str(tmp_path))


def test_corpus_ignores_leftovers_of_a_killed_run(tmp_path, small_corpus):
    _, good = small_corpus
    folder = corpus.corpus_dir(str(tmp_path), SMALL_VOCAB, SMALL_BYTES)
    os.makedirs(folder)
    # Killed after the tokens file landed but before the manifest, and mid-way through a temp write.
    write_tokens(os.path.join(folder, corpus.TOKENS_FILE), [7] * 10)
    stale_tmp = os.path.join(folder, corpus.TOKENS_FILE + ".tmp.12345.dead")
    write_tokens(stale_tmp, [9] * 3)
    files = corpus.prepare_default_corpus(str(tmp_path), SMALL_VOCAB, max_bytes=SMALL_BYTES)
    assert not os.path.exists(stale_tmp)
    np.testing.assert_array_equal(
        np.fromfile(files.tokens_path, "<u4"), np.fromfile(good.tokens_path, "<u4")
    )
    assert (files.num_tokens, files.num_documents) == (good.num_tokens, good.num_documents)


def test_corpus_concurrent_preparation(tmp_path):
    code = (
        "import sys, json; from olmo2_jax.data import corpus; "
        "f = corpus.prepare_default_corpus(sys.argv[1], 512, max_bytes=200_000); "
        "print(json.dumps([f.tokens_path, f.num_tokens, f.num_documents]))"
    )
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-c", code, str(tmp_path)]
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(cmd, stdout=pipe, stderr=pipe, env=env) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    path, num_tokens, _ = outs[0]
    assert os.path.getsize(path) == 4 * num_tokens
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp." in f]


def test_tokenizer_round_trip_and_pickle(small_corpus):
    _, files = small_corpus
    tok = load_tokenizer(f"sentencepiece:{files.tokenizer_path}")
    text = "def f(x):\n\tif x:  # naïve ✓ 日本語 🙂\r\n        return  x\n\n"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text  # byte fallback + identity normalization: exact
    assert tok.decode(np.array(ids + [tok.eos_id])) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.vocab_size == tok.vocab_size


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'tiktoken:x'.*sentencepiece:<path"):
        load_tokenizer("tiktoken:x")
    with pytest.raises(ValueError, match=r"'just-a-path'.*sentencepiece:<path"):
        load_tokenizer("just-a-path")
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(f"sentencepiece:{missing}")


# ---------------------------------------------------------------- token windows


def test_windows_read_back_exactly(tmp_path):
    path = write_tokens(tmp_path / "a.npy", np.arange(35))  # 4 windows of 8, tail of 3 dropped
    src = TokenWindows([path], seq_len=8)
    assert len(src) == 4
    for i in range(4):
        w = src[i]
        np.testing.assert_array_equal(w["inputs"], np.arange(8 * i, 8 * i + 8))
        np.testing.assert_array_equal(w["targets"], list(range(8 * i + 1, 8 * i + 8)) + [0])
        np.testing.assert_array_equal(w["loss_mask"], [1] * 7 + [0])
        dtypes = (w["inputs"].dtype, w["targets"].dtype, w["loss_mask"].dtype)
        assert dtypes == (np.int32, np.int32, np.float32)
        assert type(w["inputs"]) is np.ndarray  # not a memmap view into the file
    with pytest.raises(IndexError):
        src[4]


def test_windows_do_not_cross_files(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_MAX_OPEN_FILES", 1)  # reads keep working as memmaps are evicted
    a = write_tokens(tmp_path / "a.npy", np.arange(0, 20))  # 2 windows, 4 tokens dropped
    short = write_tokens(tmp_path / "short.npy", np.arange(100, 105))  # no window
    b = write_tokens(tmp_path / "b.npy", np.arange(200, 217))  # 2 windows, 1 dropped
    src = TokenWindows([a, short, b], seq_len=8)
    assert src.windows_per_file == [2, 0, 2] and len(src) == 4
    starts = [int(src[i]["inputs"][0]) for i in [0, 2, 1, 3]]
    assert starts == [0, 200, 8, 208]
    np.testing.assert_array_equal(src[1]["inputs"], np.arange(8, 16))  # not 16..19 + 200..203
    restored = pickle.loads(pickle.dumps(src))  # grain workers get a pickled copy
    np.testing.assert_array_equal(restored[3]["inputs"], src[3]["inputs"])


def test_windows_bad_files(tmp_path):
    good = write_tokens(tmp_path / "good.npy", np.arange(64))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        TokenWindows([good, str(tmp_path / "missing.npy")], seq_len=8)
    odd = tmp_path / "odd.npy"
    odd.write_bytes(b"\0" * 30)
    with pytest.raises(ValueError, match="odd.npy.*not a multiple of 4"):
        TokenWindows([good, str(odd)], seq_len=8)
    with_header = tmp_path / "header.npy"
    np.save(with_header, np.arange(64, dtype=np.uint32))
    with pytest.raises(ValueError, match="header.npy.*header"):
        TokenWindows([str(with_header)], seq_len=8)
    tiny = write_tokens(tmp_path / "tiny.npy", np.arange(5))
    with pytest.raises(ValueError, match="seq_len=8.*tiny.npy"):
        TokenWindows([tiny], seq_len=8)
    with pytest.raises(ValueError, match="No token files"):
        TokenWindows([], seq_len=8)
    big_id = write_tokens(tmp_path / "bigid.npy", list(range(63)) + [5000])  # in the last window
    with pytest.raises(ValueError, match=r"bigid.npy.*5000.*position 63.*vocab_size=1000"):
        TokenWindows([good, big_id], seq_len=8, vocab_size=1000)
    assert len(TokenWindows([big_id], seq_len=8, vocab_size=5001)) == 8


# ---------------------------------------------------------------- grain pipeline

SEQ, WINDOWS = 4, 48


@pytest.fixture()
def token_file(tmp_path) -> str:
    return write_tokens(tmp_path / "tokens.npy", np.arange(SEQ * WINDOWS + 3))


def take(it, n: int, seq_len: int = SEQ) -> list[list[int]]:
    return [window_ids(next(it), seq_len) for _ in range(n)]


def test_pipeline_batches_and_seeds(token_file):
    it = make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=0)
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, SEQ), np.int32),
        "targets": ((8, SEQ), np.int32),
        "loss_mask": ((8, SEQ), np.float32),
    }
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    same = take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=0), 12)
    assert same == take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=0), 12)
    assert same != take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=1), 12)
    epoch1 = sum(same[:6], [])
    assert sorted(epoch1) == list(range(WINDOWS)) != epoch1  # shuffled, each window once
    assert sorted(sum(same[6:], [])) == list(range(WINDOWS))  # epoch 2 complete too
    assert same[:6] != same[6:]  # ... in a new order


def test_pipeline_seeds_do_not_share_epochs(token_file):
    """grain seeds epoch e with seed + e; mixing keeps seed 1 from replaying seed 0's epoch 2."""
    seed0 = sum(take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=0), 12), [])
    seed1 = sum(take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=1), 6), [])
    assert seed0[WINDOWS:] != seed1


def test_pipeline_processes_get_disjoint_shards(token_file):
    kw = dict(seq_len=SEQ, global_batch_size=8, seed=3, process_count=2)
    p0 = take(make_iterator([token_file], process_index=0, **kw), 6)
    p1 = take(make_iterator([token_file], process_index=1, **kw), 6)
    assert all(len(b) == 4 for b in p0 + p1)
    first0, first1 = sum(p0[:6], []), sum(p1[:6], [])
    assert not set(first0) & set(first1)
    assert sorted(first0 + first1) == list(range(WINDOWS))
    # Together the processes read the single-process stream, element by element.
    single = sum(take(make_iterator([token_file], seq_len=SEQ, global_batch_size=8, seed=3), 6), [])
    assert single[0::2] == first0 and single[1::2] == first1


def test_pipeline_config_errors(token_file):
    with pytest.raises(ValueError, match="global_batch_size=6.*process_count=4"):
        make_dataset([token_file], seq_len=SEQ, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        make_dataset(
            [token_file], seq_len=SEQ, global_batch_size=8, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="vocab_size=10"):
        make_dataset([token_file], seq_len=SEQ, global_batch_size=8, seed=0, vocab_size=10)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_pipeline_resumes_exactly(token_file, num_workers):
    kw = dict(seq_len=SEQ, global_batch_size=8, seed=7, num_workers=num_workers)
    reference = make_iterator([token_file], **kw)
    expected = [next(reference) for _ in range(10)]
    reference.close()

    it = make_iterator([token_file], **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    it.close()
    resumed = make_iterator([token_file], **kw)
    resumed.set_state(state)
    for want in expected[5:]:  # crosses the epoch boundary at batch 6
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    resumed.close()


def test_pipeline_over_default_corpus(small_corpus):
    _, files = small_corpus
    tok = SentencePieceTokenizer(files.tokenizer_path)
    it = make_iterator(
        [files.tokens_path], seq_len=64, global_batch_size=4, seed=0, vocab_size=tok.vocab_size
    )
    batch = next(it)
    it.close()
    tokens = np.fromfile(files.tokens_path, "<u4")
    windows = tokens[: len(tokens) // 64 * 64].reshape(-1, 64)
    for row in batch["inputs"]:
        assert (windows == row).all(axis=1).any()
