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
import math
import os
import re
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


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def hlo_ops(hlo_text: str) -> dict:
    """{instruction name: {"shape", "flops", "op_name"}} from an optimized HLO module's text.

    FLOPs are counted for dots, for fusions that call a computation holding dots (XLA's
    Triton GEMM fusions) and for cuBLAS/cuBLASLt GEMM custom calls (2 x output elements x
    contracted size), so a profile row can show the matmul's TFLOP/s; `op_name` is the JAX
    source op (e.g. `.../mlp/dot_general`), which names the model part a kernel comes from.
    """
    shapes, info, comp_dots, comp_op = {}, {}, collections.Counter(), {}
    comp = None
    for line in hlo_text.splitlines():
        if line.endswith("{") and "=" not in line.split("(")[0]:
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = shape
        operands = re.findall(r"%?([\w.\-]+)", rest.split(")", 1)[0])
        op_name = re.search(r'op_name="([^"]*)"', rest)
        flops = 0.0
        if opcode == "dot" or (opcode == "custom-call" and re.search(
                r'custom_call_target="__cublas\S*(gemm|matmul)', rest)):
            key, end = (("lhs_contracting_dims={", "}") if opcode == "dot"
                        else ('"lhs_contracting_dimensions":[', "]"))
            cd = rest.split(key, 1)[1].split(end, 1)[0] if key in rest else ""
            lhs = _dims(shapes.get(operands[0], "")) if operands else []
            k = math.prod(lhs[int(d)] for d in re.findall(r"\d+", cd) if int(d) < len(lhs))
            flops = 2.0 * math.prod(_dims(shape)) * k
            if comp:
                comp_dots[comp] += flops
        if comp and op_name and line.lstrip().startswith("ROOT"):
            comp_op[comp] = op_name.group(1)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        info[name] = {"shape": shape.split("{")[0], "flops": flops,
                      "op_name": op_name.group(1) if op_name else None,
                      "calls": calls.group(1) if calls else None}
    for v in info.values():
        c = v.pop("calls")
        if c:
            v["flops"] = v["flops"] or comp_dots.get(c, 0.0)
            v["op_name"] = v["op_name"] or comp_op.get(c)
    return info


def summarize(trace_dir: str, top: int = 30, ops: dict | None = None) -> dict:
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
    hlo_of = {}
    spans = []
    for e in kernels:
        args = e.get("args", {})
        op = args.get("hlo_op") or e["name"]
        key = f"{op} [{e['name'][:60]}]" if args.get("hlo_op") else op
        hlo_of[key] = op
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
    out = {"trace": path, "device_wall_us": wall, "device_busy_us": busy,
           "kernel_sum_us": total, "kernels": len(kernels),
           "classes": {k: v for k, v in by_cls.most_common()},
           "top": [_row(k, v, total, count[k], (ops or {}).get(hlo_of[k]))
                   for k, v in by_op.most_common(top)]}
    if ops:
        out["sources"] = _by_source(by_op, count, hlo_of, ops, total, top)
    return out


def _by_source(by_op, count, hlo_of, ops, total, top):
    """Kernel time summed by JAX source op and shape, with the layer index folded
    (`layers_7` -> `layers_*`): one row per kind of work in the step, e.g. all the MLP
    up-projection GEMMs of the forward, with their TFLOP/s. An HLO op that launches several
    kernels (a GEMM and its small helper) counts its FLOPs once per execution."""
    us, n = collections.Counter(), collections.Counter()
    runs, hlos = collections.Counter(), collections.defaultdict(set)
    for key, t in by_op.items():
        op = ops.get(hlo_of[key])
        src = re.sub(r"layers_\d+", "layers_*", op["op_name"] or hlo_of[key]) if op else key
        k = (src, op["shape"] if op else "")
        us[k] += t
        n[k] += count[key]
        runs[hlo_of[key]] = max(runs[hlo_of[key]], count[key])
        if op and op["flops"]:
            hlos[k].add(hlo_of[key])
    rows = []
    for (src, shape), t in us.most_common(top):
        r = {"source": src, "shape": shape, "us": t, "pct": 100 * t / total, "count": n[src, shape]}
        flops = sum(ops[h]["flops"] * runs[h] for h in hlos[src, shape])
        if flops:
            r["tflops"] = round(flops / t / 1e6, 1)
        rows.append(r)
    return rows


def _row(key, us, total, n, op):
    """A table row; with the op's HLO info, its shape, source op and (for GEMMs) TFLOP/s."""
    r = {"op": key, "us": us, "pct": 100 * us / total, "count": n}
    if op:
        r.update(shape=op["shape"], op_name=op["op_name"])
        if op["flops"]:
            r["tflops"] = round(op["flops"] * n / us / 1e6, 1)
    return r


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
        if "shape" in r:
            tf = f"  {r['tflops']} TFLOP/s" if "tflops" in r else ""
            print(f"      {r['shape']}{tf}  {(r['op_name'] or '')[-90:]}")
    if s.get("sources"):
        print(f"\n   by source op, layers folded{'':<67}{'ms':>9}{'%':>7}{'n':>7}  TFLOP/s")
        for r in s["sources"]:
            src = r["source"]
            for noise in ("jit(train_step)/", "(Transformer.hidden)", "Transformer._layers/",
                          "checkpoint/", "while/body/", "closed_call/"):
                src = src.replace(noise, "")
            print(f"   {(src[-70:] + ' ' + r['shape'])[:94]:<94}{r['us'] / 1e3 / per:>9.3f}"
                  f"{r['pct']:>7.1f}{r['count'] // per:>7}  {r.get('tflops', '')}")


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
    return (*_traced(run), a.steps, compiled.as_text())


def profile_decode(a):
    import numpy as np

    from bench.generate import ONE_B, random_model
    from olmo2_jax.generate import Generator
    s = ONE_B
    cfg, params = random_model(s, "bfloat16")
    gen = Generator(cfg, params, cache_chunk=a.cache_chunk or None)
    rng = np.random.default_rng(0)
    prompts = lambda: rng.integers(1, s["vocab"], (a.batch, a.prompt_len)).tolist()  # noqa
    gen(prompts(), max_new_tokens=a.new_tokens)
    p = prompts()
    return (*_traced(lambda: gen(p, max_new_tokens=a.new_tokens)), a.new_tokens, None)


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
    return (*_traced(run), a.steps, None)


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
    ap.add_argument("--cache_chunk", type=int, default=0,
                    help="decode: Generator's cache_chunk (0 = the whole cache each step)")
    ap.add_argument("--impl", default="mgpu", choices=("mgpu", "pallas", "cudnn", "xla"),
                    help="attention: the implementation to profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-command-buffers", action="store_true",
                    help="train: run XLA GPU ops outside CUDA graphs, so each kernel is named "
                         "by its HLO op and the table shows its shape, source and TFLOP/s")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.no_command_buffers:  # before jax starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_command_buffer=").strip()
    import jax
    profile = {"train": profile_train, "decode": profile_decode,
               "attention": profile_attention}[a.what]
    d, secs, per, hlo_text = profile(a)  # hlo_text: the train step's optimized HLO, or None
    s = summarize(d, a.top, hlo_ops(hlo_text) if hlo_text else None)
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
