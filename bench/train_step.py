"""Training-step throughput, MFU and peak memory of a real config on one accelerator.

    python bench/train_step.py --config=configs/1b.py --seq=4096 \
        --variant=b8:train.global_batch_size=8 \
        --variant=b8_full:train.global_batch_size=8,model.remat=full --out=/tmp/ts.json

Each variant is `name:key=value,key=value` over the config (any config key, e.g.
`model.attention=pallas`, `model.kernels=xla`). Every variant runs the real `train_step`
(jit, donation, the config's mesh over all local devices) on fresh random tokens: it is
compiled, warmed up with `--warmup` steps at the timed shape, then `--steps` (>= 3) steps
are timed one by one; the row gives their median and spread (min, max). MFU uses the PaLM
convention (config.flops_per_token) over the chip's bf16 peak. On a GPU each row also
carries the SM clock and power over the timed steps (bench/gpu_clock.py): the H200 runs at
its power cap, so a slower clock is told apart from a slower step.
Prints one JSON line per variant and a table last. `--transformers=compile` first times
transformers Olmo2 + torch.compile at the same shape (bench/transformers_step.py, in its own
process, before JAX takes the GPU's memory; same warm-up and timed step counts), at each
distinct global batch of the variants unless `--transformers-batch` fixes one, and adds
each variant's ratio to the run at its batch ("vs hf"; the table names that batch):

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
from olmo2_jax import loss as loss_lib  # noqa: E402
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


def variant_config(config_path: str, seq: int, overrides: str):
    """The config a variant runs: the file's, at `seq`, one micro-batch per step unless the
    overrides set train.micro_batch_size, then the overrides."""
    c = runpy.run_path(config_path)["get_config"]()
    c.data.seq_len = seq
    c.train.micro_batch_size = 0
    c.optim.warmup_steps = 10
    return apply_overrides(c, overrides)


def build(config_path: str, seq: int, overrides: str):
    """(compiled step, state, fresh-batch fn, config) for a config with overrides."""
    c = variant_config(config_path, seq, overrides)
    config_lib.validate(c, jax.device_count())
    mesh = sharding.make_mesh(c)
    model = Transformer(ModelConfig.from_config(c.model))
    tx, schedule = optim.make_optimizer(c.optim, c.train.steps)
    accum = c.train.global_batch_size // config_lib.micro_batch_size(c)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, shardings = train.create_state(model, tx, mesh, jax.random.PRNGKey(0))
        bs = sharding.batch_sharding(mesh)
        step_fn = train.jit_train_step(model, tx, schedule, loss_lib.LossConfig.from_config(c),
                                       accum_steps=accum, mesh=mesh, shardings=shardings,
                                       batch_sharding=bs)
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
    return {"batch": B, "seq": T, "step_s": round(dt, 4), "tok_s": round(tok_s),
            "tflops_per_device": round(tok_s * fpt / 1e12 / jax.device_count(), 1),
            "mfu": round(tok_s * fpt / (peak * jax.device_count()), 4),
            "peak_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 1),
            "compile_s": round(compile_s, 1), "loss": round(loss, 4),
            "step_s_spread": [round(min(times), 4), round(max(times), 4)],
            **({"gpu_clock": summary} if (summary := clock.summary()) else {})}


def transformers_batches(config_path: str, seq: int, variants, fixed: int | None):
    """The transformers batch each variant is compared at: `fixed`, else the variant's global
    batch; None where the variant changes the model's parameter count (transformers runs the
    config file's model) or its overrides do not apply."""
    base = config_lib.count_params(variant_config(config_path, seq, "").model)["total"]
    out = []
    for _, overrides in variants:
        try:
            c = variant_config(config_path, seq, overrides)
        except Exception:  # noqa: BLE001 -- the variant's own run reports the error
            out.append(None)
            continue
        same = config_lib.count_params(c.model)["total"] == base
        out.append((fixed or c.train.global_batch_size) if same else None)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/1b.py")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (>= 3; median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the timed shape")
    ap.add_argument("--variant", action="append", default=None,
                    help="name:key=value,... (repeatable); default: b8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--transformers", choices=("compile", "eager"), default=None,
                    help="also time transformers Olmo2 at the same shape (torch.compile or "
                         "eager; bench/transformers_step.py) and print each variant's ratio")
    ap.add_argument("--transformers-batch", type=int, default=None,
                    help="batch of the transformers step (default: each variant's global batch)")
    args = ap.parse_args()
    if args.steps < 3 or args.warmup < 1:
        ap.error("--steps must be >= 3 and --warmup >= 1 (warm calls only, median of >= 3)")
    variants = [spec.partition(":")[::2] for spec in args.variant or
                ["b8:train.global_batch_size=8"]]
    # first, in its own process per batch: JAX holds most of the GPU's memory once it starts
    hf_at = (transformers_batches(args.config, args.seq, variants, args.transformers_batch)
             if args.transformers else [None] * len(variants))
    hf = {b: _transformers_step(args, b) for b in dict.fromkeys(filter(None, hf_at))}
    device = jax.devices()[0]
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{jax.device_count()} x {device.device_kind}", "jax": jax.__version__,
              "config": args.config, "seq": args.seq, "steps": args.steps,
              "warmup": args.warmup}
    print(json.dumps(header), flush=True)
    fpt = config_lib.flops_per_token(variant_config(args.config, args.seq, "").model, args.seq)
    peak = metrics.peak_flops_per_device() or float("nan")
    for r in hf.values():
        if "tok_s" in r:
            r["mfu"] = round(r["tok_s"] * fpt / peak, 4)
        print(json.dumps(r), flush=True)
    results = []
    for (name, overrides), b in zip(variants, hf_at):
        try:
            r = {"variant": name, **bench(args.config, args.seq, overrides, args.steps,
                                          args.warmup)}
        except Exception as e:  # noqa: BLE001 -- one failing variant must not lose the others
            r = {"variant": name, "error": repr(e)[:400]}
        if b is not None and "tok_s" in r and "tok_s" in hf[b]:
            r.update(transformers_batch=b, vs_transformers=round(r["tok_s"] / hf[b]["tok_s"], 3))
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**header, "transformers": list(hf.values()), "results": results}, f,
                      indent=2)
    print_table(header, results, list(hf.values()), bool(args.transformers))


def print_table(header, results, hf, with_hf):
    print(f"\n{header['device']}, jax {header['jax']}, {header['config']}, seq {header['seq']}: "
          f"median of {header['steps']} timed steps after {header['warmup']} warm-up steps"
          + ("; vs hf = tok/s over transformers' at the batch named" if with_hf else ""))
    print(f"{'variant':<28}{'batch':>6}{'tok/s':>10}{'MFU':>8}{'step s':>9}{'min-max s':>16}"
          f"{'peak GiB':>10}{'compile s':>11}" + (f"{'vs hf':>12}" if with_hf else ""))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<28} ERROR {r['error'][:80]}")
            continue
        lo, hi = r["step_s_spread"]
        vs = (f"{r['vs_transformers']:.2f} @b{r['transformers_batch']}"
              if "vs_transformers" in r else "-")
        print(f"{r['variant']:<28}{r['batch']:>6}{r['tok_s']:>10}{r['mfu']:>8.3f}"
              f"{r['step_s']:>9.3f}{f'{lo:.3f}-{hi:.3f}':>16}{r['peak_gib']:>10}"
              f"{r['compile_s']:>11}" + (f"{vs:>12}" if with_hf else ""))
    for r in hf:
        label = f"{r['impl']} b{r['batch']}"
        if "tok_s" not in r:
            print(f"{label:<28} ERROR {r.get('error', '')[:80]}")
            continue
        lo, hi = r["step_s_spread"]
        print(f"{label:<28}{r['batch']:>6}{r['tok_s']:>10}{r['mfu']:>8.3f}{r['step_s']:>9.3f}"
              f"{f'{lo:.3f}-{hi:.3f}':>16}{r['peak_gib']:>10}{'-':>11}")


def _transformers_step(args, batch: int) -> dict:
    """bench/transformers_step.py in a subprocess: its JSON line, or {"error": ...}."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "transformers_step.py"),
           f"--config={args.config}", f"--seq={args.seq}", f"--batch={batch}",
           f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if args.transformers == "compile":
        cmd.append("--compile")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"impl": "transformers" + ("+compile" if args.transformers == "compile" else ""),
                "batch": batch, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
