"""Generation with the KV cache: cache == full forward, greedy == transformers, sampling."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from olmo2_jax import generate, sharding
from olmo2_jax.generate import Generator, Sampling, sample_logits
from olmo2_jax.model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=500, padded_vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                   n_kv_heads=2, head_dim=16, mlp_hidden=96, rope_theta=10_000.0,
                   dtype=jnp.float32, remat="none")
PROMPTS = [[5, 9, 2], [7] * 11, list(range(20, 27)), list(range(100, 116))]


@pytest.fixture(scope="module")
def tiny():
    params = nn.unbox(Transformer(TINY).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 4), jnp.int32)))["params"]
    return params, Generator(TINY, params)


def full_logits(params, tokens, cfg=TINY):
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    return np.asarray(fwd(params, jnp.asarray([tokens])))[0]


@pytest.mark.parametrize("scan", [True, False])
def test_decode_with_cache_equals_full_forward(scan):
    """Teacher-forced: prefill left-padded prompts, then feed the rest of each row one
    token at a time; every step's logits equal the full forward's at that position."""
    cfg = ModelConfig(**{**TINY.__dict__, "scan_layers": scan})
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32)))["params"]
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 500, n).tolist() for n in (9, 14, 11)]
    prompt_lens, steps = [3, 8, 5], 6
    P = max(prompt_lens)
    full = [full_logits(params, row, cfg) for row in rows]
    decode = jax.jit(lambda *a: model.apply({"params": params}, *a, method=Transformer.decode))
    tokens, start = generate.left_pad([r[:n] for r, n in zip(rows, prompt_lens)], P, 3)
    positions = np.maximum(np.arange(P)[None] - start[:, None], 0)
    logits, (k, v) = decode(tokens, positions, None, 0, start)
    L, S = cfg.n_layers, P + steps
    cache = [jnp.zeros((L, 3, cfg.n_kv_heads, S, cfg.head_dim)).at[:, :, :, :P].set(x)
             for x in (k, v)]
    for step in range(steps + 1):
        for b, n in enumerate(prompt_lens):
            np.testing.assert_allclose(logits[b], full[b][n - 1 + step], atol=2e-5, rtol=2e-5)
        if step == steps:
            break
        index = P + step
        tok = np.array([[row[n + step]] for row, n in zip(rows, prompt_lens)])
        logits, (k, v) = decode(tok, (index - start)[:, None], tuple(cache), index, start)
        cache = [c.at[:, :, :, index].set(x[:, :, :, 0]) for c, x in zip(cache, (k, v))]


def test_generated_logprobs_equal_full_forward(tiny):
    """Through the jitted while-loop: each greedy token is the full forward's argmax and its
    log-probability matches, for rows of different lengths batched together."""
    params, gen = tiny
    tokens, logprobs = gen(PROMPTS, max_new_tokens=12, return_logprobs=True)
    for prompt, new, lp in zip(PROMPTS, tokens, logprobs):
        assert len(new) == 12
        full = full_logits(params, prompt + new)[len(prompt) - 1:-1, :TINY.vocab_size]
        np.testing.assert_array_equal(full.argmax(-1), new)
        ref = jax.nn.log_softmax(full)[np.arange(12), new]
        np.testing.assert_allclose(lp, ref, atol=2e-5)


def test_batch_and_mesh_do_not_change_tokens(tiny):
    params, gen = tiny
    batched = gen(PROMPTS, max_new_tokens=10)
    alone = [gen([p], max_new_tokens=10)[0] for p in (PROMPTS[0], PROMPTS[2])]  # one bucket
    assert [batched[0], batched[2]] == alone
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), sharding.MESH_AXES)
    sharded = Generator(TINY, params, mesh)
    assert sharded.batch_multiple == 8
    assert sharded(PROMPTS, max_new_tokens=10) == batched
    assert Generator(TINY, params, unroll_layers=False)(PROMPTS, max_new_tokens=10) == batched
    chunked = Generator(TINY, params, cache_chunk=4)  # segments of 4, 4, 2 steps
    assert chunked(PROMPTS, max_new_tokens=10) == batched


def test_stop_tokens_and_max_new_tokens(tiny):
    _, gen = tiny
    free = gen(PROMPTS, max_new_tokens=16)
    stop = free[1][4]
    out = gen(PROMPTS, max_new_tokens=16, stop_tokens=[stop])
    for f, o in zip(free, out):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:cut]
    assert [len(o) for o in gen(PROMPTS, max_new_tokens=3)] == [3] * 4


def test_sampling_filters():
    rng = jax.random.PRNGKey(0)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(rng, 1)[0]
    draw = lambda s: np.asarray(sample_logits(logits, keys, s))  # noqa: E731
    freq = lambda x: np.bincount(x, minlength=4) / len(x)  # noqa: E731
    np.testing.assert_allclose(freq(draw(Sampling(1.0))), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(freq(draw(Sampling(1.0, top_k=2))), [0.625, 0.375, 0, 0],
                               atol=0.03)
    # top_p=0.7: 0.5 alone is below 0.7, so {0.5, 0.3} is the nucleus.
    np.testing.assert_allclose(freq(draw(Sampling(1.0, top_p=0.7))), [0.625, 0.375, 0, 0],
                               atol=0.03)
    np.testing.assert_allclose(freq(draw(Sampling(1e-3))), [1, 0, 0, 0])
    assert set(draw(Sampling(0.0))) == {0}
    hot = freq(draw(Sampling(2.0)))  # temperature flattens
    assert hot[3] > 0.08 and hot[0] < 0.45


def test_sampled_generation_is_seeded(tiny):
    _, gen = tiny
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a = gen(PROMPTS, max_new_tokens=8, sampling=s, seed=1)
    assert a == gen(PROMPTS, max_new_tokens=8, sampling=s, seed=1)
    assert a != gen(PROMPTS, max_new_tokens=8, sampling=s, seed=2)
    assert all(0 <= t < TINY.vocab_size for row in a for t in row)


def test_bad_requests_fail_before_compiling(tiny):
    _, gen = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen([[1, 600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        gen([[1]], max_new_tokens=2, sampling=Sampling(1.0, top_p=0))


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.test_convert import tiny_hf_model
    from olmo2_jax import checkpoint, convert
    hf = tiny_hf_model(seed=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    meta = checkpoint.read_meta(ckpt)
    cfg = ModelConfig(**{**checkpoint.model_config(meta).__dict__, "dtype": jnp.float32})
    mesh = sharding.make_mesh(checkpoint.config_from_meta(meta))
    gen = Generator(cfg, checkpoint.load_params(ckpt, cfg, mesh), mesh)
    prompts = [[11, 42, 7], list(range(300, 317)), [5] * 9, list(range(60, 66))]
    ours = gen(prompts, max_new_tokens=32)
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              do_sample=False, max_new_tokens=32, pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()
    assert all(len(n) == 32 for n in ours)

    # The CLI: one JSON line; text needs a tokenizer, which this checkpoint lacks.
    from olmo2_jax.generate import main
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["generate", f"--ckpt={ckpt}", "--prompt_ids=11,42,7", "--max_new_tokens=32"])
    line = json.loads(buf.getvalue())
    assert line["tokens"][:8] == ours[0][:8] and line["text"] is None
    with pytest.raises(SystemExit, match="holds no tokenizer"):
        main(["generate", f"--ckpt={ckpt}", "--prompt=hi"])


def test_padding_ids_are_never_generated(tiny):
    """Padded-vocab rows (ids >= vocab_size) with the largest logits are still never drawn,
    greedy or sampled; the same weights without the mask do draw them."""
    params, _ = tiny
    w0 = params["lm_head"][:, :1]  # padding columns +-100 x column 0: one of each pair wins
    signs = np.resize([100.0, -100.0], TINY.padded_vocab_size - TINY.vocab_size)
    lm_head = params["lm_head"].at[:, TINY.vocab_size:].set(w0 * signs)
    hot = {**params, "lm_head": lm_head}
    gen = Generator(TINY, hot)
    for s in (Sampling(), Sampling(temperature=2.0, top_k=20)):
        out = gen(PROMPTS, max_new_tokens=6, sampling=s)
        assert all(0 <= t < TINY.vocab_size for row in out for t in row), s
    unmasked = dataclasses.replace(TINY, vocab_size=TINY.padded_vocab_size)
    out = Generator(unmasked, hot)(PROMPTS, max_new_tokens=6)
    assert all(t >= TINY.vocab_size for row in out for t in row)
