"""Mix files, weighted and natural mixing, resume, document masking, the n-gram loss mask."""

import os
import runpy

import numpy as np
import pytest

from olmo2_jax import config as config_lib
from olmo2_jax import train
from olmo2_jax.data import loader, mixture, pipeline
from olmo2_jax.data.mixture import Source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8


def write_tokens(path, tokens):
    np.asarray(tokens, dtype="<u4").tofile(path)
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    """Source A: tokens 0.., source B: tokens 1_000_000..; each window starts at a multiple
    of SEQ, so a row's first token names its source and window."""
    a = [write_tokens(tmp_path / f"a{i}.npy", np.arange(i * 4000, (i + 1) * 4000)) for i in (0, 1)]
    b = [write_tokens(tmp_path / "b0.npy", 1_000_000 + np.arange(2400))]
    return [Source("web", tuple(a)), Source("code", tuple(b))]


def batches(it, n):
    return [next(it) for _ in range(n)]


def mix_iter(sources, seed=0, **kw):
    kw.setdefault("global_batch_size", 10)
    return pipeline.make_iterator(sources=sources, seq_len=SEQ, seed=seed, read_threads=2, **kw)


def test_read_mix_file_format(tmp_path):
    root = tmp_path / "data"
    for sub in ("web", "code"):
        (root / sub / "allenai" / "dolma2-tokenizer").mkdir(parents=True)
        for i in range(2):
            write_tokens(root / sub / "allenai" / "dolma2-tokenizer" / f"part-{i}.npy", [1, 2])
    mix = tmp_path / "mix.txt"
    mix.write_text("# a comment\n\nweb,web/{TOKENIZER}/part-0.npy\ncode,code/{TOKENIZER}/*.npy\n"
                   "web, web/{TOKENIZER}/part-1.npy\nabs,/x/y.npy\nremote,gs://bucket/z.npy\n")
    got = mixture.read_mix(str(mix), tokenizer_id="allenai/dolma2-tokenizer", base=str(root))
    tok_dir = "allenai/dolma2-tokenizer"
    assert [s.label for s in got] == ["web", "code", "abs", "remote"]
    assert got[0].paths == (f"{root}/web/{tok_dir}/part-0.npy", f"{root}/web/{tok_dir}/part-1.npy")
    assert got[1].paths == tuple(f"{root}/code/{tok_dir}/part-{i}.npy" for i in range(2))
    assert got[2].paths == ("/x/y.npy",) and got[3].paths == ("gs://bucket/z.npy",)
    # Every error names the file and line, and the fix.
    for text, match in [("web\n", r"mix.txt:1: expected `label,path`"),
                        ("x,nothing/*.npy\n", r"mix.txt:1: .*matches no file.*mix_base"),
                        ("x,gs://b/*.npy\n", r"mix.txt:1: globs work for local paths only"),
                        ("# only comments\n", "lists no `label,path` line")]:
        mix.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            mixture.read_mix(str(mix), tokenizer_id="t", base=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Mix file not found"):
        mixture.read_mix(str(tmp_path / "none.txt"), tokenizer_id="t")
    sources = [Source("web", ()), Source("code", ())]
    assert mixture.source_weights(sources, "web=7, code=3") == [0.7, 0.3]
    assert mixture.source_repeats(sources, "code=2") == [1.0, 2.0]
    for bad, match in [("web=0.7", r"no weight for \['code'\]"), ("web=x,code=1", "'web=x'"),
                       ("web=1,math=1", "unknown source 'math'"), ("web=0,code=0", "sum to 0")]:
        with pytest.raises(ValueError, match=match):
            mixture.source_weights(sources, bad)


def test_weighted_mix_shares_order_and_resume(two_sources):
    it = mix_iter(two_sources, weights=[0.7, 0.3])
    rows = np.concatenate([b["inputs"][:, 0] for b in batches(it, 1000)])  # 10k instances
    share_code = float(np.mean(rows >= 1_000_000))
    assert abs(share_code - 0.3) <= 0.01, share_code
    # Source B has 300 windows, so 3000 draws cycle through it 10 times, reshuffled each time.
    b_rows = rows[rows >= 1_000_000]
    assert sorted(b_rows[:300] // SEQ) == sorted(np.arange(1_000_000, 1_002_400, SEQ) // SEQ)
    assert b_rows[:300].tolist() != b_rows[300:600].tolist()
    it.close()
    again = mix_iter(two_sources, weights=[0.7, 0.3])
    first = batches(again, 50)
    np.testing.assert_array_equal(np.concatenate([b["inputs"][:, 0] for b in first]), rows[:500])
    other = mix_iter(two_sources, seed=1, weights=[0.7, 0.3])
    assert next(other)["inputs"][:, 0].tolist() != rows[:10].tolist()
    # Mid-epoch resume: state after 37 batches -> a fresh iterator yields batch 38 exactly.
    fresh = mix_iter(two_sources, weights=[0.7, 0.3])
    batches(fresh, 37)
    state = fresh.get_state()
    expected = batches(fresh, 2)
    resumed = mix_iter(two_sources, weights=[0.7, 0.3])
    resumed.set_state(state)
    for want, got in zip(expected, batches(resumed, 2)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    for x in (again, other, fresh, resumed):
        x.close()


def test_resume_with_grain_worker_processes(two_sources):
    kw = dict(weights=[0.5, 0.5], num_workers=2, instance=pipeline.InstanceOptions(
        eos_id=3, document_masking=True))
    it = mix_iter(two_sources, **kw)
    batches(it, 5)
    state = it.get_state()
    want = next(it)
    it.close()
    resumed = mix_iter(two_sources, **kw)
    resumed.set_state(state)
    got = next(resumed)
    resumed.close()
    assert set(got) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    for key in want:
        np.testing.assert_array_equal(want[key], got[key])


def test_natural_mix_with_repeats(two_sources):
    windows = {"web": 1000, "code": 300}
    for repeats, code_per_epoch in [(None, 300), ([1.0, 2.0], 600), ([1.0, 0.5], 150)]:
        epoch = 1000 + code_per_epoch
        it = mix_iter(two_sources, repeats=repeats, global_batch_size=epoch)
        rows = next(it)["inputs"][:, 0]  # exactly one epoch
        it.close()
        code = rows[rows >= 1_000_000]
        assert len(code) == code_per_epoch and int(np.sum(rows < 1_000_000)) == windows["web"]
        counts = np.unique(code, return_counts=True)[1]
        assert set(counts.tolist()) == {2 if code_per_epoch == 600 else 1}
    with pytest.raises(ValueError, match="exclude each other"):
        mix_iter(two_sources, weights=[1, 1], repeats=[1, 1])


def test_processes_split_the_mixed_stream(two_sources):
    whole = mix_iter(two_sources, weights=[0.7, 0.3], global_batch_size=8)
    parts = [mix_iter(two_sources, weights=[0.7, 0.3], global_batch_size=8, process_index=p,
                      process_count=2) for p in (0, 1)]
    for _ in range(3):
        g = next(whole)["inputs"]
        p0, p1 = (next(p)["inputs"] for p in parts)
        np.testing.assert_array_equal(g[0::2], p0)
        np.testing.assert_array_equal(g[1::2], p1)
    for x in [whole, *parts]:
        x.close()


def test_document_masking_and_ngram_mask(tmp_path):
    eos = 99
    stream = np.array([5, 6, eos, 7, 8, 9, eos, eos] + [1, 2] * 4 + [4] * 8 + [10] * 8)
    path = write_tokens(tmp_path / "t.npy", stream)
    opts = pipeline.InstanceOptions(eos_id=eos, document_masking=True, ngram_min_repeats=4,
                                    ngram_max_period=2)
    windows = pipeline.TokenWindows([path], SEQ)
    finish = pipeline.FinishInstance(opts)
    first = finish.map(windows[0])
    assert first["segment_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert first["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert first["loss_mask"].tolist() == [1] * 7 + [0]
    for i in (1, 2, 3):  # "1 2" x4, "4" x8 and "10" x8: all runs of >= 4 repeats
        out = finish.map(windows[i])
        assert not out["loss_mask"].any()
        assert out["segment_ids"].tolist() == [0] * SEQ
        assert out["positions"].tolist() == list(range(SEQ))
    off = pipeline.FinishInstance(pipeline.InstanceOptions(ngram_min_repeats=0)).map(windows[2])
    assert off["loss_mask"].sum() == SEQ - 1 and "segment_ids" not in off
    with pytest.raises(ValueError, match="EOS id"):
        pipeline.InstanceOptions(document_masking=True)


def mix_config(tmp_path, two_sources, **data):
    mix = tmp_path / "mix.txt"
    mix.write_text("".join(f"{s.label},{p}\n" for s in two_sources for p in s.paths))
    c = runpy.run_path(os.path.join(REPO, "configs/tiny.py"))["get_config"]()
    c.model.update(vocab_size=100_352, padded_vocab_size=100_352)
    c.data.update(dict(mix=str(mix), seq_len=SEQ, weights="web=0.7,code=0.3"), **data)
    c.train.update(global_batch_size=10)
    return c


def test_config_wires_the_mix(tmp_path, two_sources, monkeypatch):
    monkeypatch.setattr(pipeline, "check_token_ids", lambda *a: None)  # code ids are 1M+
    c = mix_config(tmp_path, two_sources, document_masking=True)
    data = loader.from_config(c)
    assert list(data.paths) == [p for s in two_sources for p in s.paths]
    it = data.iterator()
    batch = next(it)
    it.close()
    direct = mix_iter(two_sources, weights=[0.7, 0.3], instance=pipeline.InstanceOptions(
        eos_id=100_257, document_masking=True))
    want = next(direct)
    direct.close()
    assert set(batch) == set(want) == {"inputs", "targets", "loss_mask", "segment_ids",
                                       "positions"}
    for key in want:
        np.testing.assert_array_equal(batch[key], want[key])
    for bad, match in [(dict(weights="web=1,code=1", repeats="code=2"), "exclude each other"),
                       (dict(paths="x.npy"), "not both"),
                       (dict(ngram_min_repeats=1), "ngram_min_repeats=1")]:
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(mix_config(tmp_path, two_sources, **bad))
    with pytest.raises(config_lib.ConfigError, match="config.data.weights: unknown source 'math'"):
        loader.from_config(mix_config(tmp_path, two_sources, weights="math=1"))
    with pytest.raises(config_lib.ConfigError, match="config.data.tokenizer='gpt9'"):
        loader.from_config(mix_config(tmp_path, two_sources, tokenizer="gpt9"))
    small = mix_config(tmp_path, two_sources)
    small.model.vocab_size = 4096
    with pytest.raises(config_lib.ConfigError, match="has 100278 tokens"):
        loader.from_config(small)


def test_remote_reads_match_memmap(two_sources, monkeypatch):
    """gs:// files are read by ranged reads; the same code path on local files must agree."""
    local = pipeline.TokenWindows(two_sources[0].paths, SEQ)
    monkeypatch.setattr(pipeline, "is_remote", lambda path: True)
    remote = pipeline.TokenWindows(two_sources[0].paths, SEQ)
    for i in (0, 499, 500, 999):
        np.testing.assert_array_equal(local[i]["inputs"], remote[i]["inputs"])


def test_training_on_a_weighted_mix_with_document_masking(tmp_path):
    """End to end through train.train: mix file, weights, document masking, n-gram mask.
    (Exact resume of the iterator is tested above; of the loop, in test_train.py.)"""
    from test_train import losses, small_config

    eos = 100_257  # dolma2's EOS in short synthetic documents, so masking has work to do
    rng = np.random.default_rng(0)
    for name, lo in (("web", 0), ("code", 128)):
        docs = [np.append(rng.integers(lo, lo + 128, rng.integers(5, 40)), eos) for _ in range(400)]
        write_tokens(tmp_path / f"{name}.npy", np.concatenate(docs))
    mix = tmp_path / "mix.txt"
    mix.write_text(f"web,{tmp_path}/web.npy\ncode,{tmp_path}/code.npy\n")
    c = small_config("", steps=2)
    c.model.update(vocab_size=100_352, padded_vocab_size=100_352, d_model=16, mlp_hidden=32)
    c.data.update(mix=str(mix), weights="web=0.7,code=0.3", document_masking=True)
    c.optim.update(warmup_steps=1, decay_steps=2)
    c.checkpoint.update(every_steps=2)
    train.train(c, str(tmp_path / "run"))
    by_step, rows = losses(tmp_path / "run")
    assert sorted(by_step) == [0, 1] and np.isfinite(list(by_step.values())).all()
    assert rows[0]["loss_tokens"] == 8 * (32 - 1)  # no instance of random text is masked


@pytest.mark.parametrize("name", ["OLMo-mix-1124.txt", "Dolmino-mix-1124.txt"])
def test_shipped_mixes_resolve_against_a_copy_of_the_data(tmp_path, name):
    mix = os.path.join(REPO, "configs", "mixes", name)
    labels = [line.split(",")[0] for line in open(mix) if line.strip() and line[0] != "#"]
    for label in labels:
        folder = tmp_path / label / "allenai" / "dolma2-tokenizer"
        folder.mkdir(parents=True)
        for i in range(2):
            write_tokens(folder / f"part-{i}-00000.npy", np.arange(64))
    sources = mixture.read_mix(mix, tokenizer_id="allenai/dolma2-tokenizer", base=str(tmp_path))
    assert [s.label for s in sources] == labels and all(len(s.paths) == 2 for s in sources)
    it = pipeline.make_iterator(sources=sources, seq_len=SEQ, global_batch_size=4, seed=0,
                                repeats=[2.0] * len(sources))
    assert next(it)["inputs"].shape == (4, SEQ)
    it.close()
