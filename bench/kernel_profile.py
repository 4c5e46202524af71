"""Where the accelerator's time goes: a kernel-time table from a JAX profiler trace.

    python bench/kernel_profile.py train --config=configs/1b.py --seq=4096 \
        --set=train.global_batch_size=8 --out=/tmp/prof_train.json
    python bench/kernel_profile.py decode --batch=64 --prompt_len=512 --new_tokens=128 --out=/tmp/pd.json
    python bench/kernel_profile.py attention --impl=mgpu --seq=4096 --steps=10 --out=/tmp/pa.json

`train` profiles `--steps` real train steps of a config (as bench/train_step.py builds
them); `decode` profiles one `Generator` call at the 1B shape (as bench/generate.py);
`attention` profiles causal attention forward + backward (`--impl` mgpu, pallas, cudnn or
xla) at bench/attention.py's shape (32768 / seq sequences, 16 heads, head_dim 128).
Both warm up (compile) first. The device events of the trace are summed by HLO op (or
kernel name) and by class (matmul, attention, reduction/elementwise fusion, copy,
collective, other); the table also gives the device's busy time against the wall time of
the profiled region, so launch gaps show as idle time. Prints the table; writes it to --out.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSES = (  # first match wins; matched against the lower-cased kernel name and HLO op
    ("attention", ("cudnn", "fmha", "flash", "attention", "mha", "sdpa")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet", "dot", "matmul", "triton_gemm")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "nccl", "collective")),
    ("copy", ("memcpy", "memset", "copy", "dynamic-update-slice", "transpose")),
    ("reduce", ("reduce", "softmax", "norm")),
    ("fusion", ("fusion", "loop", "input_", "wrapped", "triton")),
)


def classify(name: str) -> str:
    n = name.lower()
    for cls, keys in CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


def summarize(trace_dir: str, top: int = 30) -> dict:
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if "/device:" in n}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0 and (
        e.get("pid") in device_pids if device_pids else "hlo_op" in e.get("args", {}))]
    if not kernels:
        return {"error": f"no device events in {path} (processes: {sorted(names.values())})"}
    by_op, by_cls, count = (collections.Counter() for _ in range(3))
    spans = []
    for e in kernels:
        args = e.get("args", {})
        op = args.get("hlo_op") or e["name"]
        key = f"{op} [{e['name'][:60]}]" if args.get("hlo_op") else op
        by_op[key] += e["dur"]
        count[key] += 1
        by_cls[classify(f"{e['name']} {op}")] += e["dur"]
        spans.append((e["ts"], e["ts"] + e["dur"]))
    spans.sort()
    busy, end = 0.0, -1.0
    for s, t in spans:  # union of kernel intervals (streams may overlap)
        if t > end:
            busy += t - max(s, end)
            end = t
    wall = spans[-1][1] - spans[0][0]
    total = sum(by_op.values())
    return {"trace": path, "device_wall_us": wall, "device_busy_us": busy,
            "kernel_sum_us": total, "kernels": len(kernels),
            "classes": {k: v for k, v in by_cls.most_common()},
            "top": [{"op": k, "us": v, "pct": 100 * v / total, "count": count[k]}
                    for k, v in by_op.most_common(top)]}


def print_summary(s: dict, label: str, per: int = 1):
    if "error" in s:
        print(f"{label}: {s['error']}")
        return
    w, b, t = s["device_wall_us"], s["device_busy_us"], s["kernel_sum_us"]
    print(f"\n== {label}: device wall {w / 1e3 / per:.2f} ms, busy {b / 1e3 / per:.2f} ms "
          f"({100 * b / w:.1f}%), {s['kernels'] // per} kernels (per unit of {per})")
    for k, v in s["classes"].items():
        print(f"   {k:<11}{v / 1e3 / per:>9.3f} ms {100 * v / t:>6.1f}%")
    print(f"   {'op':<100}{'ms':>9}{'%':>7}{'n':>7}")
    for r in s["top"]:
        print(f"   {r['op'][:100]:<100}{r['us'] / 1e3 / per:>9.3f}{r['pct']:>7.1f}"
              f"{r['count'] // per:>7}")


def _traced(run):
    """Runs `run` (which blocks on its results) under the profiler: (trace dir, seconds)."""
    import jax
    d = tempfile.mkdtemp()
    t = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        run()
    return d, time.perf_counter() - t


def profile_train(a):
    import jax

    from bench.train_step import build  # noqa: PLC0415
    compiled, state, batch, _ = build(a.config, a.seq, ",".join(a.set or []))
    for _ in range(2):
        state, m = compiled(state, batch())
    jax.block_until_ready(m)
    batches = [batch() for _ in range(a.steps)]
    jax.block_until_ready(batches)

    def run(state=state):
        for b in batches:
            state, m = compiled(state, b)
        jax.block_until_ready(m)
    return (*_traced(run), a.steps)


def profile_decode(a):
    import numpy as np

    from bench.generate import ONE_B, random_model
    from olmo2_jax.generate import Generator
    s = ONE_B
    cfg, params = random_model(s, "bfloat16")
    kw = dict(decode_attention=a.decode_attention, cache_chunk=a.cache_chunk or None)
    gen = Generator(cfg, params, **kw)
    rng = np.random.default_rng(0)
    prompts = lambda: rng.integers(1, s["vocab"], (a.batch, a.prompt_len)).tolist()  # noqa
    gen(prompts(), max_new_tokens=a.new_tokens)
    p = prompts()
    return (*_traced(lambda: gen(p, max_new_tokens=a.new_tokens)), a.new_tokens)


def profile_attention(a):
    import jax

    from bench.attention import fwd_bwd_fn, inputs
    args = inputs(32768 // a.seq, a.seq, 16, 16, 128)
    f = jax.jit(fwd_bwd_fn(a.impl))
    jax.block_until_ready(f(*args))

    def run():
        for _ in range(a.steps):
            out = f(*args)
        jax.block_until_ready(out)
    return (*_traced(run), a.steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("train", "decode", "attention"))
    ap.add_argument("--config", default="configs/1b.py")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--set", action="append", help="config override key=value (train)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--decode_attention", default=None)
    ap.add_argument("--cache_chunk", type=int, default=0)
    ap.add_argument("--impl", default="mgpu", choices=("mgpu", "pallas", "cudnn", "xla"),
                    help="attention: the implementation to profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import jax
    profile = {"train": profile_train, "decode": profile_decode,
               "attention": profile_attention}[a.what]
    d, secs, per = profile(a)
    s = summarize(d, a.top)
    s.update(what=a.what, args=vars(a), host_seconds=secs, per=per, jax=jax.__version__,
             device=jax.devices()[0].device_kind,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    unit = {"train": "per step", "decode": "per decode step", "attention": "per call"}[a.what]
    print_summary(s, f"{a.what} ({unit}; host {secs:.3f} s for {per})", per)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
