"""Decode throughput: olmo2_jax `Generator` beside transformers `generate` with its static
cache, in one run on one device, against the HBM roofline.

    python bench/generate.py --out=/tmp/generate.json                  # one GPU, 1B shape
    python bench/generate.py --tiny --out=/tmp/generate_tiny.json      # CPU smoke run

Default shape: OLMo-2-1B (d_model 2048, 16 layers, 16 heads, vocab 100352), bf16, batch 64,
prompt 512, 512 new tokens, greedy, random weights, no stop token (every row generates all
of them). Ours is the default `Generator` (one jitted prefill, then the whole greedy decode
in one compiled loop); theirs is `model.generate(..., cache_implementation="static")`,
which on a CUDA GPU torch.compiles its decode step.

Method, the same on both sides: `--warmup` untimed calls at exactly the timed batch, prompt
length and new tokens (the compiles happen there), then `--repeats` (>= 3) timed calls, each
on fresh random prompts already on the device; the median and the spread (min, max) are
reported. Throughput = batch x new tokens / wall time of the whole call, prefill included.
Our prefill alone is timed the same way, so the table also gives decode-only tokens/s.
transformers runs first, in its own process (this file with --transformers-worker), so JAX
then has the GPU to itself with its default memory preallocation.

Roofline: new tokens/s if every decode step read the weights (all but the embedding table,
of which a step gathers `batch` rows) and the mean filled KV cache (prompt + new/2 slots)
once, in the run's dtype, at the device's HBM bandwidth (HBM_GB_S by device kind, or
`--hbm_gb_s`; none on a CPU). Prints one JSON line per measurement, then a table; writes
everything to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ONE_B = dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden=8192,
             vocab=100352)
TINY = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=256, vocab=1024)
# HBM bandwidth (GB/s) by substring of the lower-cased device kind, first match wins; None =
# unknown (GH200 comes with HBM3 or HBM3e): pass --hbm_gb_s.
HBM_GB_S = (("gh200", None), ("h100 pcie", 2000), ("h100 nvl", 3900), ("h100", 3350),
            ("h200", 4800), ("h800", 3350), ("b200", 8000), ("a100-sxm4-80gb", 2039),
            ("a100 80gb pcie", 1935), ("a100", 1555), ("v5p", 2765), ("v5 lite", 819),
            ("v5e", 819), ("v6 lite", 1640), ("v6e", 1640), ("v4", 1200))
HF_MODES = ("static", "dynamic")


def hbm_gb_s(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((bw for key, bw in HBM_GB_S if key in kind), None)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, runs on CPU in seconds")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new_tokens", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls per side at the timed shapes (compiles)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per side (>= 3; median and min/max reported)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (--tiny)")
    p.add_argument("--hf_modes", default="static",
                   help="transformers caches to time, comma list of static, dynamic "
                        "('' = skip transformers)")
    p.add_argument("--cache_chunk", type=int, default=None,
                   help="Generator's cache_chunk (default: none, the whole cache each step)")
    p.add_argument("--hbm_gb_s", type=float, default=None,
                   help="HBM bandwidth for the roofline (default: by device kind)")
    p.add_argument("--out", default=None, help="JSON results path (required but for the worker)")
    p.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shape = TINY if a.tiny else ONE_B
    a.batch = a.batch or (4 if a.tiny else 64)
    a.prompt_len = a.prompt_len or (16 if a.tiny else 512)
    a.new_tokens = a.new_tokens or (16 if a.tiny else 512)
    a.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
    if min(a.batch, a.prompt_len, a.new_tokens, a.warmup) < 1:
        p.error("--batch, --prompt_len, --new_tokens and --warmup must be >= 1")
    if a.repeats < 3:
        p.error("--repeats must be >= 3 (median of >= 3 warm calls)")
    if a.dtype not in ("bfloat16", "float32"):
        p.error(f"--dtype={a.dtype}: choose bfloat16 or float32")
    bad = set(filter(None, a.hf_modes.split(","))) - set(HF_MODES)
    if bad:
        p.error(f"--hf_modes: unknown {sorted(bad)}; choose from {','.join(HF_MODES)}")
    if not a.out and not a.transformers_worker:
        p.error("--out is required")
    return a, shape


def timed(make_input, fn, sync, warmup: int, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of fn(make_input()), after `warmup` untimed calls; inputs
    are made (and on the device) before each call's clock starts."""
    for _ in range(warmup):
        fn(make_input())
    sync()
    times = []
    for _ in range(repeats):
        x = make_input()
        sync()
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return times


def stats(times: list[float]) -> dict:
    return {"seconds": statistics.median(times),
            "seconds_spread": [min(times), max(times)], "all_seconds": times}


def bench_hf(a, shape) -> dict:
    """transformers' rows and versions; runs in the worker process."""
    import torch
    import transformers
    from transformers import Olmo2Config, Olmo2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Olmo2Config(
        hidden_size=shape["d_model"], intermediate_size=shape["mlp_hidden"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=max(4096, a.prompt_len + a.new_tokens), rope_theta=5e5,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Olmo2ForCausalLM(cfg)
    model = model.to(getattr(torch, a.dtype)).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for mode in filter(None, a.hf_modes.split(",")):
        kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                  pad_token_id=0)
        if mode == "static":
            kw["cache_implementation"] = "static"

        def prompts():
            return torch.randint(1, shape["vocab"], (a.batch, a.prompt_len), device=device)

        def run(x):
            out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
            assert out.shape == (a.batch, a.prompt_len + a.new_tokens), out.shape

        try:
            with torch.no_grad():
                rows.append({"impl": "transformers", "mode": mode,
                             **stats(timed(prompts, run, sync, a.warmup, a.repeats))})
        except Exception as e:  # noqa: BLE001 -- one failing mode must not hide the others
            rows.append({"impl": "transformers", "mode": mode, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "env": {"torch": torch.__version__,
                                  "transformers": transformers.__version__,
                                  "torch_device": torch.cuda.get_device_name() if device == "cuda"
                                  else device}}


def run_hf(a, argv) -> dict:
    """bench_hf in its own process (JAX not yet started here): its result, or error rows."""
    cmd = [sys.executable, os.path.abspath(__file__), "--transformers-worker",
           *[x for x in argv if not x.startswith("--out")]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return {"rows": [{"impl": "transformers", "mode": m, "error": why[:300]}
                         for m in filter(None, a.hf_modes.split(","))], "env": {}}
    return json.loads(lines[-1])


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


def bytes_per_decode_step(cfg, params, batch, prompt_len, new_tokens, dtype) -> float:
    """Weights (less the embedding table) + the mean filled KV cache, in `dtype`."""
    import jax
    import jax.numpy as jnp
    size = jnp.dtype(dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(params)) - params["embedding"].size
    kv = 2 * cfg.n_layers * batch * (prompt_len + new_tokens / 2) * cfg.n_kv_heads * cfg.head_dim
    return (weights + kv) * size


def bench_ours(a, shape) -> dict:
    import jax
    import numpy as np

    from olmo2_jax.generate import Generator, Sampling
    cfg, params = random_model(shape, a.dtype)
    gen = Generator(cfg, params, cache_chunk=a.cache_chunk)
    rng = np.random.default_rng(0)
    sync = lambda: None  # noqa: E731 -- each call below blocks on its results

    def prompts():
        return rng.integers(1, shape["vocab"], (a.batch, a.prompt_len)).tolist()

    def run(p):
        out = gen(p, max_new_tokens=a.new_tokens)  # returns host lists: blocks
        assert len(out) == a.batch and all(len(o) == a.new_tokens for o in out)

    def prefill(p):
        tokens, start, _ = gen.prepare(p, a.new_tokens, Sampling())
        with gen._ctx():
            out = gen._prefill(gen.params, tokens, start,
                               cache_len=tokens.shape[1] + a.new_tokens)
        jax.block_until_ready(out)

    row = {"impl": "olmo2_jax", "mode": "Generator" + (f" chunk {a.cache_chunk}"
                                                       if a.cache_chunk else ""),
           **stats(timed(prompts, run, sync, a.warmup, a.repeats))}
    pre = timed(prompts, prefill, sync, a.warmup, a.repeats)
    row.update(prefill_seconds=statistics.median(pre),
               prefill_seconds_spread=[min(pre), max(pre)])
    device = jax.devices()[0].device_kind
    return {"rows": [row], "env": {"jax": jax.__version__, "jax_device": device},
            "bytes_per_decode_step": bytes_per_decode_step(cfg, params, a.batch, a.prompt_len,
                                                           a.new_tokens, a.dtype)}


def add_rates(r: dict, new: int) -> dict:
    if "seconds" in r:
        lo, hi = r["seconds_spread"]
        r.update(new_tokens_per_s=new / r["seconds"], new_tokens_per_s_spread=[new / hi, new / lo])
        if "prefill_seconds" in r:
            r["decode_only_tokens_per_s"] = new / (r["seconds"] - r["prefill_seconds"])
    return r


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a, shape = parse(argv)
    if a.transformers_worker:
        print(json.dumps(bench_hf(a, shape)), flush=True)
        return None
    new = a.batch * a.new_tokens
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(),
           "command": " ".join(["python", "bench/generate.py", *argv])}
    rows = []
    if a.hf_modes:  # first: JAX takes most of the GPU's memory once it starts
        hf = run_hf(a, argv)
        env.update(hf["env"])
        rows += hf["rows"]
        for r in hf["rows"]:
            print(json.dumps(add_rates(r, new)), flush=True)
    ours = bench_ours(a, shape)
    env.update(ours["env"])
    for r in ours["rows"]:
        rows.append(add_rates(r, new))
        print(json.dumps(r), flush=True)
    bw = a.hbm_gb_s or hbm_gb_s(env["jax_device"])
    roofline = a.batch * bw * 1e9 / ours["bytes_per_decode_step"] if bw else None
    result = {"env": env, "shape": shape, "batch": a.batch, "prompt_len": a.prompt_len,
              "new_tokens": a.new_tokens, "dtype": a.dtype, "warmup": a.warmup,
              "repeats": a.repeats, "results": rows, "hbm_gb_s": bw,
              "bytes_per_decode_step": ours["bytes_per_decode_step"],
              "roofline_new_tokens_per_s": roofline}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"-> {a.out}")
    print_table(result)
    return result


def print_table(res: dict):
    env, rows = res["env"], res["results"]
    base = next((r for r in rows if r["impl"] == "transformers" and "seconds" in r), None)
    print(f"\n{env['date']}  {env['jax_device']}  jax {env['jax']}  torch "
          f"{env.get('torch', '-')}  transformers {env.get('transformers', '-')}")
    print(f"shape {'tiny' if res['shape'] == TINY else '1B'} {res['dtype']}, batch {res['batch']}, "
          f"prompt {res['prompt_len']}, {res['new_tokens']} new tokens, greedy; "
          f"{res['warmup']} warm-up call(s) at these shapes, then median (min-max) of "
          f"{res['repeats']} timed calls per row")
    vs = f"x {base['impl']} {base['mode']}" if base else "x hf"
    print(f"{'impl':<14}{'mode':<14}{'s median':>10}{'s min-max':>16}{'new tok/s':>12}"
          f"{vs:>22}{'decode-only tok/s':>19}")
    for r in rows:
        if "seconds" not in r:
            print(f"{r['impl']:<14}{r['mode']:<14}  failed: {r['error']}")
            continue
        lo, hi = r["seconds_spread"]
        ratio = f"{r['new_tokens_per_s'] / base['new_tokens_per_s']:.2f}" if base else "-"
        dec = r.get("decode_only_tokens_per_s")
        print(f"{r['impl']:<14}{r['mode']:<14}{r['seconds']:>10.3f}{f'{lo:.3f}-{hi:.3f}':>16}"
              f"{r['new_tokens_per_s']:>12,.0f}{ratio:>22}{f'{dec:,.0f}' if dec else '-':>19}")
    roof = res["roofline_new_tokens_per_s"]
    at = f"{res['hbm_gb_s']:,.0f} GB/s" if roof else "? GB/s (unknown device: --hbm_gb_s)"
    print(f"{'HBM roofline':<28}{'':>26}{f'{roof:,.0f}' if roof else '-':>12}"
          f"   weights + mean KV cache read once per decode step at {at}")


if __name__ == "__main__":
    main()
