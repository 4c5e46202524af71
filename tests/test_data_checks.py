"""Bad token files are refused when the data is resolved, before anything compiles: ids past
the vocabulary anywhere in a file, int64 / .npy files, manifests that disagree, folders."""

import json
import logging
import os
import time

import numpy as np
import pytest

from olmo2_jax import config as config_lib
from olmo2_jax import train
from olmo2_jax.data import loader, pipeline
from olmo2_jax.data.pipeline import TokenWindows


def write_tokens(path, tokens) -> str:
    np.asarray(tokens, dtype="<u4").tofile(path)
    return str(path)


def write_manifest(folder, shards, **top):
    """What prepare_data writes beside its shards (the fields the loader reads)."""
    manifest = {"dtype": "uint32", "tokenizer": "dolma2", "vocab_size": 100278, **top,
                "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(autouse=True)
def fresh_max_id_cache(tmp_path, monkeypatch):
    """Each test starts with empty in-memory and on-disk caches under its own tmp dir."""
    monkeypatch.setenv("OLMO2_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "_MAX_IDS", {})
    monkeypatch.setattr(pipeline, "_DISK", {})


def no_scan(*args, **kwargs):
    raise AssertionError("the file was scanned")


def test_an_id_past_the_vocab_mid_file_is_refused_before_training(tmp_path):
    from test_train import small_config, token_file

    data = token_file(tmp_path / "tokens.npy")  # 40,000 ids < 256: 1,250 windows of 32
    tokens = np.fromfile(data, "<u4")
    tokens[20_000], tokens[30_001] = 300, 7_000  # the middle; neither first nor last window
    tokens.tofile(data)
    c = small_config(data)
    want = (r"config.data.paths: .*tokens.npy: token id 300 at position 20000 is >= "
            r"vocab_size=256 \(config.model.vocab_size\).*config.data.tokenizer.*prepare_data")
    t0 = time.perf_counter()
    with pytest.raises(config_lib.ConfigError, match=want):
        train.train(c, str(tmp_path / "run"))
    assert time.perf_counter() - t0 < 5  # refused up front: no model built, nothing compiled
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    with pytest.raises(config_lib.ConfigError, match=want):
        loader.from_config(c)
    with pytest.raises(ValueError, match="token id 300 at position 20000"):
        TokenWindows([data], seq_len=32, vocab_size=256)
    c.model.update(vocab_size=7_001, padded_vocab_size=7_040)  # every id fits now
    assert loader.from_config(c).paths == (data,)


def test_the_max_id_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_CACHE_MIN_BYTES", 0)  # cache even this small file on disk
    path = write_tokens(tmp_path / "a.npy", np.arange(1000) % 500)
    assert TokenWindows([path], seq_len=8, vocab_size=500).num_tokens == [1000]
    cache = json.loads((tmp_path / "cache" / "token_max_ids.json").read_text())["max_ids"]
    assert list(cache.values()) == [499]
    monkeypatch.setattr(pipeline, "_MAX_IDS", {})  # a new process: only the disk cache
    monkeypatch.setattr(pipeline, "_DISK", {})
    monkeypatch.setattr(pipeline, "_scan", no_scan)
    TokenWindows([path], seq_len=8, vocab_size=500)
    with pytest.raises(AssertionError, match="scanned"):  # rewritten: another size, scanned
        TokenWindows([write_tokens(path, np.arange(999))], seq_len=8, vocab_size=1000)


def test_the_manifest_max_id_spares_the_scan_for_files_of_its_size(tmp_path, monkeypatch):
    a = write_tokens(tmp_path / "part-00000.npy", np.arange(64))
    b = write_tokens(tmp_path / "part-00001.npy", np.arange(32))
    write_manifest(tmp_path, [{"file": "part-00000.npy", "tokens": 64, "max_id": 63},
                              {"file": "part-00001.npy", "tokens": 32, "max_id": 31}])
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_scan", no_scan)
        assert pipeline.check_token_files([a, b], vocab_size=64) == [64, 32]
    with pytest.raises(ValueError, match=r"part-00000.npy: token id 50 at position 50 .*"
                                         r"vocab_size=50.*--tokenizer=dolma2 \(vocab 100278\)"):
        pipeline.check_token_files([a, b], vocab_size=50)
    write_tokens(b, np.arange(31))  # truncated copy: the manifest is not trusted, it is an error
    with pytest.raises(ValueError, match=r"part-00001.npy is 124 bytes but the manifest.json "
                                         r"beside it lists 32 uint32 tokens.*truncated"):
        pipeline.check_token_files([a, b], vocab_size=64)


def test_int64_token_files_are_refused(tmp_path):
    ids = np.arange(1, 200, dtype="<i8")  # 1592 bytes: a multiple of 4 that reads as uint32
    plain = tmp_path / "plain.npy"
    ids.tofile(plain)
    with pytest.raises(ValueError, match=r"plain.npy looks like int64 token ids, not the raw "
                                         r"uint32 that prepare_data writes.*astype\('<u4'\)"):
        TokenWindows([str(plain)], seq_len=8)
    prepared = tmp_path / "prepared"  # beside a manifest, the size gives it away too
    prepared.mkdir()
    ids[:8].tofile(prepared / "part-00000.npy")
    write_manifest(prepared, [{"file": "part-00000.npy", "tokens": 8, "max_id": 8}])
    with pytest.raises(ValueError, match=r"part-00000.npy is 64 bytes but the manifest.json "
                                         r"beside it lists 8 uint32 tokens.*int64"):
        TokenWindows([str(prepared / "part-00000.npy")], seq_len=4)


def test_npy_headers_name_their_dtype(tmp_path):
    np.save(tmp_path / "i64.npy", np.arange(64, dtype=np.int64))
    with pytest.raises(ValueError, match=r"i64.npy has a NumPy .npy header \(dtype int64, "
                                         r"shape \(64,\)\).*np.load\(path\).astype"):
        TokenWindows([str(tmp_path / "i64.npy")], seq_len=8)
    np.save(tmp_path / "f32.npy", np.ones(64, dtype=np.float32))
    with pytest.raises(ValueError, match=r"f32.npy .*dtype float32.*not token ids"):
        TokenWindows([str(tmp_path / "f32.npy")], seq_len=8)


def test_a_prepared_folder_as_data_paths(tmp_path):
    from test_train import small_config

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    b = write_tokens(prepared / "part-00001.npy", np.arange(64))
    a = write_tokens(prepared / "part-00000.npy", np.arange(64))
    write_tokens(prepared / "stray.npy", np.arange(64))  # not in the manifest: not read
    write_manifest(prepared, [{"file": "part-00000.npy", "tokens": 64, "max_id": 63},
                              {"file": "part-00001.npy", "tokens": 64, "max_id": 63}])
    assert loader.from_config(small_config(str(prepared))).paths == (a, b)
    (prepared / "manifest.json").unlink()  # no manifest: every *.npy, sorted
    assert loader.from_config(small_config(f"{prepared}/")).paths == (
        a, b, str(prepared / "stray.npy"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(config_lib.ConfigError, match=r"config.data.paths: .*empty' is a folder "
                                                     "with no token files.*prepare_data"):
        loader.from_config(small_config(str(empty)))
    with pytest.raises(ValueError, match=r"prepared is a directory.*config.data.paths"):
        TokenWindows([str(prepared)], seq_len=8)


def test_remote_files_use_the_manifest_else_read_through_with_a_warning(
        tmp_path, monkeypatch, caplog):
    good = write_tokens(tmp_path / "part-00000.npy", np.arange(64))
    write_manifest(tmp_path, [{"file": "part-00000.npy", "tokens": 64, "max_id": 63}])
    other = tmp_path / "other"
    other.mkdir()
    bad = write_tokens(other / "x.npy", np.r_[np.arange(40), 999, np.arange(23)])
    monkeypatch.setattr(pipeline, "is_remote", lambda path: True)  # ranged reads via epath
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_scan", no_scan)
        assert TokenWindows([good], seq_len=8, vocab_size=64).num_tokens == [64]
    with caplog.at_level(logging.WARNING, logger="olmo2_jax.data.pipeline"):
        with pytest.raises(ValueError, match="x.npy: token id 999 at position 40"):
            TokenWindows([good, bad], seq_len=8, vocab_size=64)
    assert "x.npy" in caplog.text and "reading them through" in caplog.text
