"""Decode throughput: olmo2_jax `Generator` beside transformers `generate`, same run.

    python bench/generate.py --out=bench/results/generate_h200.json          # H200, 1B shape
    python bench/generate.py --tiny --out=/tmp/generate_tiny.json             # CPU smoke run

Default shape (the issue's): OLMo-2-1B (d_model 2048, 16 layers, 16 heads, vocab 100352),
bf16, batch 64, prompt 512, 512 new tokens, greedy, random weights, no stop token (every
row generates all 512). Throughput = batch * new tokens / wall time of the whole call
(prefill included, as for transformers); the prefill alone is timed too, so the table also
shows decode-only tokens/s. Each figure is the median of --repeats timed calls after one
warm-up (compile) call, each on fresh random prompts. transformers runs first (default
dynamic cache, then static cache) and releases its GPU memory before JAX starts.
Prints one JSON line per measurement, then a table; writes everything to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ONE_B = dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden=8192,
             vocab=100352)
# olmo2_jax decode variants: (layers unrolled, cache read, cache_chunk); see Generator.
VARIANTS = {"unrolled": (True, "reduce", None), "scan": (False, "reduce", None),
            "unr+einsum": (True, "einsum", None), "unr+chunk128": (True, "reduce", 128),
            "unr+chunk64": (True, "reduce", 64)}
TINY = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=256, vocab=1024)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, runs on CPU in seconds")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new_tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement "
                   "(median reported); at the 1B shape a transformers call takes ~30 s")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) or float32")
    p.add_argument("--hf_modes", default="dynamic,static",
                   help="transformers cache modes to time (comma list; '' = skip transformers)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="olmo2_jax decode variants: unrolled (default Generator: layers "
                   "unrolled, whole cache read by a reduce each step), scan (layers "
                   "scanned), unr+einsum (cache read by a batched matmul), unr+chunk128 "
                   "(segments of 128 steps reading only the filled cache slots)")
    p.add_argument("--hbm_gb_s", type=float, default=4800.0,
                   help="memory bandwidth for the printed roofline (H200: 4800 GB/s)")
    p.add_argument("--out", required=True, help="JSON results path")
    a = p.parse_args()
    shape = TINY if a.tiny else ONE_B
    a.batch = a.batch or (4 if a.tiny else 64)
    a.prompt_len = a.prompt_len or (16 if a.tiny else 512)
    a.new_tokens = a.new_tokens or (16 if a.tiny else 512)
    a.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
    if min(a.batch, a.prompt_len, a.new_tokens, a.repeats) < 1:
        p.error("--batch, --prompt_len, --new_tokens and --repeats must be >= 1")
    bad = set(a.variants.split(",")) - set(VARIANTS)
    if bad or not a.variants:
        p.error(f"--variants: unknown {sorted(bad)}; choose from {','.join(VARIANTS)}")
    if a.dtype not in ("bfloat16", "float32"):
        p.error(f"--dtype={a.dtype}: choose bfloat16 or float32")
    return a, shape


def bench_hf(a, shape, emit):
    try:
        import torch
        from transformers import Olmo2Config, Olmo2ForCausalLM
    except Exception as e:  # noqa: BLE001 -- still time our side, and say why HF is missing
        import traceback
        traceback.print_exc()
        for mode in [m for m in a.hf_modes.split(",") if m]:
            emit(impl="transformers", mode=mode, error=f"import failed: {e!r}"[:300])
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Olmo2Config(
        hidden_size=shape["d_model"], intermediate_size=shape["mlp_hidden"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=max(4096, a.prompt_len + a.new_tokens), rope_theta=5e5,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    model = Olmo2ForCausalLM(cfg).to(device, dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for mode in [m for m in a.hf_modes.split(",") if m]:
        kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                  pad_token_id=0)
        if mode == "static":
            kw["cache_implementation"] = "static"
        try:
            times = []
            with torch.no_grad():
                # Short warm-up, as /work/shared/bench/anchor_hf_generate.py does.
                x = torch.randint(1, shape["vocab"], (a.batch, a.prompt_len), device=device)
                short = max(1, min(16, a.new_tokens))
                model.generate(x[:, :min(64, a.prompt_len)], **{
                    **kw, "max_new_tokens": short, "min_new_tokens": short})
                for _ in range(a.repeats):
                    x = torch.randint(1, shape["vocab"], (a.batch, a.prompt_len), device=device)
                    sync()
                    t = time.perf_counter()
                    out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
                    sync()
                    times.append(time.perf_counter() - t)
                    assert out.shape[1] - a.prompt_len == a.new_tokens, out.shape
            emit(impl="transformers", mode=mode, seconds=statistics.median(times),
                 all_seconds=times)
        except Exception as e:  # one failing mode must not hide the others
            emit(impl="transformers", mode=mode, error=repr(e)[:300])
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"torch": torch.__version__, "torch_device": device}


def random_model(shape: dict, dtype: str):
    """(ModelConfig, random params) of a bench shape (ONE_B / TINY) in `dtype`."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from olmo2_jax.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=shape["vocab"], padded_vocab_size=shape["vocab"],
                      d_model=shape["d_model"], n_layers=shape["n_layers"],
                      n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"],
                      head_dim=shape["d_model"] // shape["n_heads"],
                      mlp_hidden=shape["mlp_hidden"], dtype=jnp.dtype(dtype), remat="none")
    init = jax.jit(lambda k: nn.unbox(Transformer(cfg).init(k, jnp.zeros((1, 1), jnp.int32))))
    return cfg, init(jax.random.PRNGKey(0))["params"]


def bench_ours(a, shape, emit):
    import jax
    import numpy as np

    from olmo2_jax.generate import Generator
    cfg, params = random_model(shape, a.dtype)
    rng = np.random.default_rng(0)
    env = {"jax": jax.__version__, "jax_device": str(jax.devices()[0].device_kind)}
    for name in a.variants.split(","):
        unroll, attn, chunk = VARIANTS[name]
        gen = Generator(cfg, params, unroll_layers=unroll, decode_attention=attn,
                        cache_chunk=chunk)
        env["bytes_per_decode_step"] = _time_ours(a, shape, emit, gen, cfg, rng, name)
        del gen
    return env


def _time_ours(a, shape, emit, gen, cfg, rng, mode):
    import jax
    import jax.numpy as jnp

    from olmo2_jax.generate import Sampling
    prompts = lambda: rng.integers(1, shape["vocab"], (a.batch, a.prompt_len)).tolist()  # noqa

    def run():
        out = gen(prompts(), max_new_tokens=a.new_tokens)
        assert all(len(o) == a.new_tokens for o in out)

    def prefill():
        tokens, start, _ = gen.prepare(prompts(), a.new_tokens, Sampling())
        with gen._ctx():
            logits, cache = gen._prefill(gen.params, tokens, start,
                                         cache_len=tokens.shape[1] + a.new_tokens)
        jax.block_until_ready((logits, cache))

    total = _timed(run, a.repeats)
    pre = _timed(prefill, a.repeats)
    emit(impl="olmo2_jax", mode=mode, seconds=statistics.median(total), all_seconds=total,
         prefill_seconds=statistics.median(pre))
    # Weights (less the embedding table, of which a step gathers B rows) + the mean KV cache.
    return (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.params))
            - gen.params["embedding"].size * gen.params["embedding"].dtype.itemsize
            + 2 * cfg.n_layers * a.batch * (a.prompt_len + a.new_tokens / 2)
            * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(a.dtype).itemsize)


def _timed(fn, repeats):
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main():
    a, shape = parse()
    new = a.batch * a.new_tokens
    rows = []

    def emit(**r):
        if "seconds" in r:
            r["new_tokens_per_s"] = new / r["seconds"]
            if "prefill_seconds" in r:
                r["decode_only_tokens_per_s"] = new / (r["seconds"] - r["prefill_seconds"])
        rows.append(r)
        print(json.dumps(r), flush=True)

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if a.hf_modes:
        env.update(bench_hf(a, shape, emit))
    env.update(bench_ours(a, shape, emit))
    roofline = a.batch / (env["bytes_per_decode_step"] / (a.hbm_gb_s * 1e9))
    result = {"env": env, "shape": shape, "batch": a.batch, "prompt_len": a.prompt_len,
              "new_tokens": a.new_tokens, "dtype": a.dtype, "results": rows,
              "roofline_new_tokens_per_s": roofline, "hbm_gb_s": a.hbm_gb_s}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)

    base = next((r["new_tokens_per_s"] for r in rows
                 if r["impl"] == "transformers" and r["mode"] == "dynamic" and "seconds" in r),
                None)
    print(f"\n{env['date']}  {env['host']}  {env.get('jax_device')}  jax {env['jax']}  "
          f"torch {env.get('torch', '-')}")
    print(f"shape {'tiny' if a.tiny else '1B'} {a.dtype}, batch {a.batch}, prompt "
          f"{a.prompt_len}, {a.new_tokens} new tokens, greedy; median of {a.repeats}")
    print(f"{'impl':<14}{'mode':<12}{'seconds':>9}{'new tok/s':>12}{'x hf dyn':>10}"
          f"{'decode-only tok/s':>19}")
    for r in rows:
        if "seconds" not in r:
            print(f"{r['impl']:<14}{r['mode']:<12}  failed: {r['error']}")
            continue
        ratio = f"{r['new_tokens_per_s'] / base:.1f}" if base else "-"
        dec = r.get("decode_only_tokens_per_s")
        print(f"{r['impl']:<14}{r['mode']:<12}{r['seconds']:>9.2f}{r['new_tokens_per_s']:>12,.0f}"
              f"{ratio:>10}{f'{dec:,.0f}' if dec else '-':>19}")
    print(f"roofline (weights + mean KV cache read once per step at {a.hbm_gb_s:.0f} GB/s): "
          f"{roofline:,.0f} new tok/s   -> {a.out}")


if __name__ == "__main__":
    main()
