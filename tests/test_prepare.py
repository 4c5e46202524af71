"""prepare_data: JSONL (plain/gz/zst) -> raw uint32 shards that read back exactly."""

import errno
import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from olmo2_jax import prepare_data
from olmo2_jax.data import corpus, prepare
from olmo2_jax.data.tokenizer import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [
    "The first document.\nWith two lines.",
    "日本語のテキスト 🙂 and naïve café",
    "def f(x):\n    return x * 2\n",
    "<|endoftext|> stays text inside a document",
    "short",
]
REPEATED = "spam " * 40  # one token repeated 40 times in a row: dropped
OPTIONS = prepare.Options(workers=2, progress=False, max_tokens_per_shard=12)


def read_shards(folder, manifest):
    files = [os.path.join(folder, s["file"]) for s in manifest["shards"]]
    return np.concatenate([np.fromfile(f, dtype="<u4") for f in files])


def write_inputs(tmp_path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("\n".join([lines[0], "{not json", json.dumps({"id": 7}), lines[1],
                                json.dumps({"text": REPEATED}), "", json.dumps({"text": 5}),
                                json.dumps({"text": ""})]) + "\n")
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(lines[2] + "\n" + lines[3] + "\n")
    zst = tmp_path / "c.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress((lines[4] + "\n").encode()))
    return plain, gz, zst


@pytest.fixture(scope="module")
def dolma2():
    return load_tokenizer("dolma2")


def test_shards_read_back_to_the_documents_plus_eos(tmp_path, dolma2):
    plain, gz, zst = write_inputs(tmp_path)
    out = tmp_path / "out"
    m = prepare.prepare([str(tmp_path / "*.jsonl"), f"{gz},{zst}"], str(out), OPTIONS)
    expected = np.concatenate([dolma2.encode(t) + [dolma2.eos_id] for t in DOCS]).astype("<u4")
    np.testing.assert_array_equal(read_shards(out, m), expected)
    assert m["documents"] == len(DOCS) and m["tokens"] == len(expected)
    assert m["dropped"] == {"repeated_ngram": 1, "empty": 1}
    assert m["dropped_lines"] == {"repeated_ngram": [f"{plain}:5"], "empty": [f"{plain}:8"]}
    assert m["documents_per_input"] == {str(plain): 2, str(gz): 2, str(zst): 1}
    assert m["malformed_lines"] == 4
    assert m["malformed_examples"] == [
        f"{plain}:2: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{plain}:3: no 'text' field", f"{plain}:6: blank line", f"{plain}:7: 'text' is int, "
        "not a string"]
    # Bounded shards that end on document boundaries (one over-long document goes alone).
    assert len(m["shards"]) > 1
    for s in m["shards"]:
        tokens = np.fromfile(out / s["file"], dtype="<u4")
        assert len(tokens) == s["tokens"] and tokens[-1] == dolma2.eos_id
        assert s["max_id"] == tokens.max()  # the trainer's vocab check reads this
        assert s["tokens"] <= OPTIONS.max_tokens_per_shard or s["documents"] == 1
        assert not tokens[:4].tobytes().startswith(b"\x93NUMPY")  # raw, no header
    assert m["dtype"] == "uint32" and m["unreadable_inputs"] == []
    assert json.loads((out / "manifest.json").read_text()) == m
    with pytest.raises(FileExistsError, match="already holds token shards"):
        prepare.prepare([str(plain)], str(out), OPTIONS)


def test_same_output_for_any_worker_count(tmp_path):
    write_inputs(tmp_path)
    a = prepare.prepare([str(tmp_path / "*.json*")], str(tmp_path / "o1"), OPTIONS)
    one = prepare.Options(workers=1, progress=False, max_tokens_per_shard=12)
    b = prepare.prepare([str(tmp_path / "*.json*")], str(tmp_path / "o2"), one)
    np.testing.assert_array_equal(read_shards(tmp_path / "o1", a), read_shards(tmp_path / "o2", b))
    assert a["shards"] == b["shards"]


def test_a_truncated_compressed_file_is_reported_not_fatal(tmp_path, dolma2):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "kept"}) + "\n")
    data = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n"
                                 for i in range(2000)).encode())
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(data[: len(data) // 2])
    m = prepare.prepare([str(broken), str(good)], str(tmp_path / "out"), OPTIONS)
    assert m["malformed_lines"] == 1 and "unreadable after line" in m["malformed_examples"][0]
    assert m["malformed_examples"][0].startswith(f"{broken}:")
    tokens = read_shards(tmp_path / "out", m)
    tail = dolma2.encode("kept") + [dolma2.eos_id]
    assert tokens[-len(tail):].tolist() == tail and m["documents_per_input"][str(good)] == 1


def zst_lines(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)  # varied text, so a corrupt block is not all repeats
    return "".join(json.dumps({"text": " ".join(f"w{x}" for x in rng.integers(0, 5000, 20))})
                   + "\n" for _ in range(n)).encode()


def test_corrupt_and_truncated_zst_are_reported_not_fatal(tmp_path, dolma2):
    compress = zstandard.ZstdCompressor(write_checksum=True).compress
    data = compress(zst_lines(3000))
    mid = len(data) // 2
    (tmp_path / "a_corrupt.jsonl.zst").write_bytes(data[:mid] + bytes(64) + data[mid + 64:])
    (tmp_path / "b_truncated.jsonl.zst").write_bytes(data[:mid])
    (tmp_path / "c_frames.jsonl.zst").write_bytes(  # two frames (zstd -T, cat a.zst b.zst)
        compress(b'{"text": "one"}\n') + compress(b'{"text": "two"}\n'))
    (tmp_path / "d_good.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    m = prepare.prepare([str(tmp_path / "*.json*")], str(tmp_path / "out"), OPTIONS)
    corrupt, truncated = (str(tmp_path / n) for n in ("a_corrupt.jsonl.zst",
                                                      "b_truncated.jsonl.zst"))
    assert len(m["unreadable_inputs"]) == 2 and m["malformed_lines"] == 2
    assert m["unreadable_inputs"][0].startswith(f"{corrupt}: unreadable after line ")
    assert "of the decompressed text): corrupt zstd data" in m["unreadable_inputs"][0]
    assert m["unreadable_inputs"][1].startswith(f"{truncated}: unreadable after line ")
    assert "ends inside a zstd frame" in m["unreadable_inputs"][1]
    per_input = m["documents_per_input"]
    assert 0 < per_input[corrupt] < 3000 and 0 < per_input[truncated] < 3000  # lines before
    assert per_input[str(tmp_path / "c_frames.jsonl.zst")] == 2
    tail = dolma2.encode("kept") + [dolma2.eos_id]
    assert read_shards(tmp_path / "out", m)[-len(tail):].tolist() == tail


def test_a_full_disk_removes_the_partial_shard_and_says_so(tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path)  # 5 documents, 3 shards of <= 12 tokens
    out = tmp_path / "out"
    write = prepare.ShardWriter.write

    def disk_full_in_the_second_shard(self, doc):
        if len(self.shards) == 2:
            self._file.write(doc.tobytes()[:6])
            self._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, doc)

    monkeypatch.setattr(prepare.ShardWriter, "write", disk_full_in_the_second_shard)
    rc = prepare_data.main([f"--input={tmp_path}/*.json*", f"--output_dir={out}", "--workers=1",
                            "--max_tokens_per_shard=12", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: cannot write to --output_dir={out}: the disk "
                                          "is full (OSError ENOSPC); removed the partial shard "
                                          "part-00001.npy.tmp; the 1 complete shard(s)")
    assert "Free space" in err[-1]
    assert sorted(os.listdir(out)) == ["part-00000.npy"]  # no .tmp, no manifest


def test_embedded_corpus_prepares_to_the_cached_stream(tmp_path):
    """--input=embedded with the corpus tokenizer gives the foundation's corpus tokens."""
    files = corpus.prepare_default_corpus(str(tmp_path / "cache"), 512, max_bytes=300_000)
    opts = prepare.Options(tokenizer=f"sentencepiece:{files.tokenizer_path}", workers=2,
                           progress=False, ngram_min_repeats=0)
    m = prepare.prepare(["embedded"], str(tmp_path / "out"), opts, embedded_max_bytes=300_000)
    np.testing.assert_array_equal(read_shards(tmp_path / "out", m),
                                  np.fromfile(files.tokens_path, dtype="<u4"))
    assert m["documents"] == files.num_documents and m["eos_id"] == corpus.EOS_ID


def test_cli(tmp_path):
    plain, _, _ = write_inputs(tmp_path)
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "olmo2_jax.prepare_data", f"--input={plain}",
           f"--output_dir={tmp_path / 'out'}", "--workers=1", "--no_progress"]
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"not zstd at all\n" * 10)
    ok = subprocess.run(cmd + [f"--input={garbage}"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["documents"] == 2 and len(summary["unreadable_inputs"]) == 1
    assert f"{plain}:2: invalid JSON" in ok.stderr  # malformed lines are logged with file:line
    assert f"warning: {garbage}: unreadable after line 0" in ok.stderr
    bad = subprocess.run(cmd[:3] + [f"--input={tmp_path / 'none*.jsonl'}",
                                    f"--output_dir={tmp_path / 'o2'}", "--tokenizer=gpt9"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "matches no file" in bad.stderr
