"""Checkpoint soups: the exact weighted average, the checks, and the stack reading the soup."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from olmo2_jax import checkpoint, convert, generate, sharding, soup, train
from olmo2_jax.model import Transformer
from test_train import losses, small_config, token_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny 4-step runs from the same init on differently shuffled data (two "anneals")."""
    root = tmp_path_factory.mktemp("soup")
    data = token_file(root / "tokens.npy")
    for name, seed in (("a", 0), ("b", 1)):
        c = small_config(data, steps=4)
        c.data.seed = seed
        train.train(c, str(root / name))
    return {"data": data, "a": str(root / "a"), "b": str(root / "b")}


def params_of(path, step=None):
    """Host numpy params of a checkpoint dir or workdir, and its meta."""
    directory = checkpoint.resolve_dir(path)
    meta = checkpoint.read_meta(directory, step)
    params = checkpoint.load_params(directory, checkpoint.model_config(meta),
                                    sharding.inference_mesh(), meta["step"])
    return jax.tree.map(np.asarray, params), meta


def test_soup_is_the_exact_average(runs, tmp_path):
    out = soup.soup([runs["a"], runs["b"]], str(tmp_path / "soup"))
    (a, _), (b, _), (s, meta) = params_of(runs["a"]), params_of(runs["b"]), params_of(out)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    half = np.float32(0.5)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(s)):
        assert z.dtype == np.float32
        np.testing.assert_array_equal(z, half * x + half * y)
    assert meta["step"] == 0 and meta["config"]["model"]["d_model"] == 32
    assert meta["soup"]["ingredients"] == [
        {"path": os.path.join(runs[k], "checkpoints"), "step": 4, "weight": 0.5} for k in "ab"]


def test_weights_and_steps_from_the_cli(runs, tmp_path, capsys):
    out = str(tmp_path / "soup")
    soup.main(["soup", f"--ckpt={runs['a']}", f"--ckpt={runs['b']}", "--step=4",
               "--weights=1,3", f"--out={out}"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [i["weight"] for i in line["ingredients"]] == [0.25, 0.75]
    (a, _), (b, _), (s, _) = params_of(runs["a"]), params_of(runs["b"]), params_of(out)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(s)):
        np.testing.assert_allclose(z, np.float32(0.25) * x + np.float32(0.75) * y,
                                   rtol=1e-6, atol=1e-7)
    big = max(jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a, b)))
    assert big > 1e-3  # the two weightings give visibly different soups
    soup.main(["soup", f"--ckpt={runs['a']}", f"--ckpt={runs['b']}", "--step=4,4",
               f"--out={tmp_path / 'per_step'}"])


def wider_checkpoint(data, path):
    """A params-only checkpoint of another model width (no training needed)."""
    c = small_config(data)
    c.model.d_model = 48
    cfg = checkpoint.model_config({"config": c.to_dict()})
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return checkpoint.write_params(str(path), params["params"], {"config": c.to_dict()})


def test_bad_soups_are_clear_errors(runs, tmp_path):
    a, b = runs["a"], runs["b"]
    with pytest.raises(soup.SoupError, match="at least 2 checkpoints"):
        soup.soup([a], str(tmp_path / "x"))
    with pytest.raises(soup.SoupError, match="1 weights for 2 checkpoints"):
        soup.soup([a, b], str(tmp_path / "x"), weights=[1.0])
    with pytest.raises(soup.SoupError, match="positive"):
        soup.soup([a, b], str(tmp_path / "x"), weights=[1.0, 0.0])
    wide = wider_checkpoint(runs["data"], tmp_path / "wide")
    with pytest.raises(soup.SoupError,
                       match=r"config\.model\.d_model differs: 32 in .*a/checkpoints \(step 4\), "
                             r"48 in .*wide \(step 0\)"):
        soup.soup([a, wide], str(tmp_path / "x"))
    for existing in (a, os.path.join(a, "checkpoints"), wide):  # never overwritten
        with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
            soup.soup([a, b], existing)
    with pytest.raises(SystemExit, match="--step='4,4,4' gives 3 steps for 2 checkpoints"):
        soup.main(["soup", f"--ckpt={a}", f"--ckpt={b}", "--step=4,4,4", "--out=/tmp/unused"])
    with pytest.raises(SystemExit, match="step 9 is not in checkpoint"):
        soup.main(["soup", f"--ckpt={a}", f"--ckpt={b}", "--step=9", f"--out={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


def test_soup_trains_generates_and_converts(runs, tmp_path, capsys):
    out = soup.soup([runs["a"], runs["b"]], str(tmp_path / "soup"))
    s, _ = params_of(out)
    # Continue training from the soup (fresh optimiser): its first loss is the soup's, below
    # the random init's on the same first batch.
    train.train(small_config(runs["data"], steps=2, init_from=out), str(tmp_path / "cont"))
    cont, _ = losses(tmp_path / "cont")
    init, _ = losses(runs["a"])
    assert cont[0] < init[0] - 0.1, (cont, init)
    capsys.readouterr()
    generate.main(["generate", f"--ckpt={out}", "--prompt_ids=1,2,3", "--max_new_tokens=4"])
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]) == 4
    safetensors = pytest.importorskip("safetensors.numpy")
    hf = tmp_path / "hf"
    convert.main(["convert", "to_hf", f"--ckpt={out}", f"--out={hf}"])
    tensors = {}
    for f in os.listdir(hf):
        if f.endswith(".safetensors"):
            tensors.update(safetensors.load_file(str(hf / f)))
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], s["embedding"])
    np.testing.assert_array_equal(tensors["lm_head.weight"], s["lm_head"].T)
