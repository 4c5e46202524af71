"""Training-step throughput, MFU and peak memory of a real config on one accelerator.

    python bench/train_step.py --config=configs/1b.py --seq=4096 \
        --variant=b8:train.global_batch_size=8 \
        --variant=b8_full:train.global_batch_size=8,model.remat=full --out=/tmp/ts.json

Each variant is `name:key=value,key=value` over the config (any config key). Every
variant runs the real `train_step` (jit, donation, the config's mesh over all local
devices) on fresh random tokens, warms up, then times `--steps` steps and reports the
median. MFU uses the PaLM convention (config.flops_per_token) over the chip's bf16 peak.
On a GPU each row also carries the SM clock and power over the timed steps
(bench/gpu_clock.py): the H200 runs at its power cap, so a slower clock is told apart
from a slower step.
Prints one JSON line per variant and a table last. `--transformers=compile` first times
transformers Olmo2 + torch.compile at the same shape (bench/transformers_step.py, in its own
process) and adds each variant's ratio to it ("vs hf"):

    python bench/train_step.py --config=configs/1b.py --transformers=compile \
        --variant=b8:train.global_batch_size=8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import runpy
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_clock import GpuClock  # noqa: E402
from olmo2_jax import config as config_lib  # noqa: E402
from olmo2_jax import metrics, optim, sharding, train  # noqa: E402
from olmo2_jax.model import ModelConfig, Transformer  # noqa: E402


def parse_value(text: str, old):
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes")
    return type(old)(text) if old is not None else text


def apply_overrides(c, spec: str):
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = parse_value(value, node[leaf])
    return c


# How the compiled GPU step's GEMMs run (train.gpu_triton_gemm): HLO ops of each kind.
GEMM_MARKERS = {"triton": '"kind":"__triton_gemm"', "cublas": '"__cublas$gemm"',
                "cublaslt": '"__cublas$lt$matmul'}


def build(config_path: str, seq: int, overrides: str):
    """(compiled step, state, fresh-batch fn, config) for a config with overrides."""
    c = runpy.run_path(config_path)["get_config"]()
    c.data.seq_len = seq
    c.train.micro_batch_size = 0
    c.optim.warmup_steps = 10
    apply_overrides(c, overrides)
    config_lib.validate(c, jax.device_count())
    mesh = sharding.make_mesh(c)
    model = Transformer(ModelConfig.from_config(c.model))
    tx, schedule = optim.make_optimizer(c.optim, c.train.steps)
    accum = c.train.global_batch_size // config_lib.micro_batch_size(c)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, shardings = train.create_state(model, tx, mesh, jax.random.PRNGKey(0))
        bs = sharding.batch_sharding(mesh)
        step_fn = train.jit_train_step(model, tx, schedule, c.train, accum_steps=accum,
                                       mesh=mesh, shardings=shardings, batch_sharding=bs)
        B, T = c.train.global_batch_size, seq

        def batch():
            tok = rng.integers(0, c.model.vocab_size, (B, T + 1), dtype=np.int32)
            return {k: jax.device_put(v, bs) for k, v in
                    {"inputs": tok[:, :-1], "targets": tok[:, 1:],
                     "loss_mask": np.ones((B, T), np.float32)}.items()}

        compiled = step_fn.lower(state, batch()).compile()
    return compiled, state, batch, c


def _progress(t0: float, what: str) -> None:
    """A line on stderr as each phase ends: a run cut off by a time limit shows where it was
    (building/compiling, or a step that does not finish)."""
    print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


def bench(config_path: str, seq: int, overrides: str, steps: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    compiled, state, batch, c = build(config_path, seq, overrides)
    compile_s = time.perf_counter() - t0
    _progress(t0, f"state built and step compiled ({overrides})")
    B, T = c.train.global_batch_size, seq
    for i in range(warmup):
        state, m = compiled(state, batch())
        jax.block_until_ready(m)
        _progress(t0, f"warm-up step {i + 1} done")
    times = []
    with GpuClock(enabled=jax.default_backend() == "gpu") as clock:
        for _ in range(steps):
            b = batch()
            jax.block_until_ready(b)
            t = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    loss = float(m["loss"])
    dt = statistics.median(times)
    tok_s = B * T / dt
    fpt = config_lib.flops_per_token(c.model, seq)
    peak = metrics.peak_flops_per_device() or float("nan")
    mem = jax.local_devices()[0].memory_stats() or {}
    hlo = compiled.as_text()
    return {"batch": B, "seq": T, "step_s": round(dt, 4), "tok_s": round(tok_s),
            "tflops_per_device": round(tok_s * fpt / 1e12 / jax.device_count(), 1),
            "mfu": round(tok_s * fpt / (peak * jax.device_count()), 4),
            "peak_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 1),
            "compile_s": round(compile_s, 1), "loss": round(loss, 4),
            "gemm_kernels": {k: hlo.count(v) for k, v in GEMM_MARKERS.items()},
            "step_s_spread": [round(min(times), 4), round(max(times), 4)],
            **({"gpu_clock": summary} if (summary := clock.summary()) else {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/1b.py")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variant", action="append", default=None,
                    help="name:key=value,... (repeatable); default: b8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpu-pallas-kernels", choices=("gpu", "mgpu"), default=None,
                    help="kernels behind model.attention=pallas on GPUs: gpu (Triton lowering, "
                         "the default) or mgpu (Mosaic GPU, Hopper; docs/kernels.md)")
    ap.add_argument("--transformers", choices=("compile", "eager"), default=None,
                    help="also time transformers Olmo2 at the same shape (torch.compile or "
                         "eager; bench/transformers_step.py) and print each variant's ratio")
    ap.add_argument("--transformers-batch", type=int, default=8,
                    help="batch size of the transformers step (the issue's anchor used 8)")
    args = ap.parse_args()
    # first, in its own process: JAX holds most of the GPU's memory once it has started
    hf = _transformers_step(args) if args.transformers else None
    if args.gpu_pallas_kernels:
        from kernels import attention as kernels_attention

        default = kernels_attention.default_backend
        kernels_attention.default_backend = lambda: (
            args.gpu_pallas_kernels if kernels_attention.current_platform() == "gpu"
            else default())
    variants = args.variant or ["b8:train.global_batch_size=8"]
    device = jax.devices()[0]
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{jax.device_count()} x {device.device_kind}", "jax": jax.__version__,
              "config": args.config, "seq": args.seq}
    print(json.dumps(header), flush=True)
    if hf is not None:
        print(json.dumps(hf), flush=True)
    results = []
    for spec in variants:
        name, _, overrides = spec.partition(":")
        try:
            r = {"variant": name, **bench(args.config, args.seq, overrides, args.steps,
                                          args.warmup)}
        except Exception as e:  # noqa: BLE001 -- one failing variant must not lose the others
            r = {"variant": name, "error": repr(e)[:400]}
        results.append(r)
        print(json.dumps(r), flush=True)
    hf_tok_s = (hf or {}).get("tok_s")
    if hf_tok_s:
        c = runpy.run_path(args.config)["get_config"]()
        fpt = config_lib.flops_per_token(c.model, args.seq)
        hf["mfu"] = round(hf_tok_s * fpt / (metrics.peak_flops_per_device() or float("nan")), 4)
        for r in results:
            if "tok_s" in r:
                r["vs_transformers"] = round(r["tok_s"] / hf_tok_s, 3)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**header, "transformers": hf, "results": results}, f, indent=2)
    print(f"\n{'variant':<24}{'tok/s':>10}{'MFU':>8}{'step s':>9}{'peak GiB':>10}{'compile s':>11}"
          + (f"{'vs hf':>8}" if hf_tok_s else ""))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {r['error'][:80]}")
        else:
            print(f"{r['variant']:<24}{r['tok_s']:>10}{r['mfu']:>8.3f}{r['step_s']:>9.3f}"
                  f"{r['peak_gib']:>10}{r['compile_s']:>11}"
                  + (f"{r['vs_transformers']:>8.2f}" if hf_tok_s else ""))
    if hf is not None:
        if hf_tok_s:
            print(f"{hf['impl'] + ' b' + str(hf['batch']):<24}{hf_tok_s:>10}{hf['mfu']:>8.3f}"
                  f"{hf['step_s']:>9.3f}{hf['peak_gib']:>10}{hf['warmup_s']:>11}")
        else:
            print(f"{'transformers':<24} ERROR {hf.get('error', '')[:80]}")


def _transformers_step(args) -> dict:
    """bench/transformers_step.py in a subprocess: its JSON line, or {"error": ...}."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "transformers_step.py"),
           f"--config={args.config}", f"--seq={args.seq}", f"--batch={args.transformers_batch}",
           f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if args.transformers == "compile":
        cmd.append("--compile")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"impl": "transformers", "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
