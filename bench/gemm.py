"""GEMM throughput at the 1B training step's shapes, and what the SwiGLU product costs
beside them: the measured baseline for fusing elementwise work into GEMMs of our own.

    python bench/gemm.py --out=/tmp/gemm.json                  # H100 / H200
    python bench/gemm.py --impls=xla --tokens=512 --quick      # anywhere (CPU: XLA only)

Per shape (M = tokens of a batch-8 step, 32768 by default) it times XLA's GEMM as the step
runs it (cuBLAS on GPUs) and, with `mgpu` in --impls, a warp-specialized Mosaic GPU Hopper
GEMM (jax's Pallas example kernel `hopper_matmul_mgpu`, a sweep of its tile/grid settings)
after checking it against XLA's result; with `ours` in --impls, our kernel
(kernels/matmul_mgpu.py) in the three layouts of a dense layer's step (nn: forward, nt:
input gradient, tn: weight gradient) against XLA's GEMM in the same layout, over a sweep of
its TUNING, and at nt's best setting with c added in its epilogue (nt+c: the input-gradient
sums) against XLA's GEMM + add. `swiglu` rows time XLA's unfused forward silu(x Wg) * (x Wu)
against its two GEMMs alone: the difference is what a GEMM with the product in its epilogue
could save per layer. `wgrad` rows time the weight-gradient GEMM dW = x^T dy (contracting the
tokens) the ways the step can write it: bf16 output, fp32 output, fp32 output added to a
gradient-accumulation buffer (what `model.weight_grad_dtype='float32'` runs: cuBLAS's beta = 1),
the bf16 output widened and added in a pass of its own, and each of those with the operands
swapped (dW^T = dy^T x, transposed back), beside the forward GEMM of the same FLOPs: in the
1B step the fp32 dW GEMMs ran 8% below the forward ones (docs/performance.md, fourteenth
session).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import rel_err, report, time_fn  # noqa: E402

D, F, V = 2048, 8192, 100352  # OLMo-2-1B


def shapes(tokens: int) -> dict[str, tuple[int, int, int]]:
    """name -> (M, K, N) of the step's forward GEMMs (the backward's have the same sizes)."""
    return {"attn_proj": (tokens, D, D), "mlp_up": (tokens, D, F), "mlp_down": (tokens, F, D),
            "lm_head_chunk": (min(tokens, 4096), D, V)}


def _operands(m, k, n, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(ka, (m, k), jnp.bfloat16),
            (jax.random.normal(kb, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16))


def _mgpu_configs(hm, quick: bool):
    """The tile/grid settings of jax's Hopper GEMM (module `hm`) to sweep."""
    dims = hm.MatmulDimension
    grid = [(dims.N, 8)] if quick else list(itertools.product((dims.M, dims.N), (4, 8, 16)))
    for wg, (minor, width) in itertools.product((dims.N, dims.M), grid):
        yield hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                              grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg)


LAYOUTS = {"nn": (False, False), "nt": (False, True), "tn": (True, False)}


def _layout_operands(m, k, n, layout):
    """Operands of out (m, n) = op(a) @ op(b) as stored in the step for this layout."""
    a, b = _operands(m, k, n)
    ta, tb = LAYOUTS[layout]
    return (a.T if ta else a), (b.T if tb else b)


def _our_configs(quick: bool):
    widths = (8,) if quick else (8, 16)
    clusters = (None,) if quick else (None, "M", "N")
    for wg, width, cluster in itertools.product(("M", "N"), widths, clusters):
        yield {"tile": (128, 128, 64, 4), "wg": wg, "width": width, "cluster": cluster}


def _sweep(row, configs, build, args, ref, flops):
    """Each setting's kernel `build(cfg)` checked against `ref`, then timed, each printed as a
    row (`row` names the shape/layout/impl); returns (time, cfg, error) of the fastest, or
    None if none built."""
    best = None
    for cfg in configs:
        try:
            f = jax.jit(build(cfg))
            err = rel_err(f(*args), ref)
            if err > 2e-2:
                raise AssertionError(f"max error {err:.3g} against XLA's result")
            t = time_fn(f, args)
        except Exception as e:  # noqa: BLE001 -- a setting that does not build is skipped
            print(json.dumps({**row, "config": str(cfg), "error": repr(e)[:300]}), flush=True)
            continue
        print(json.dumps({**row, "config": _describe(cfg), "ms": round(t * 1e3, 4),
                          "tflops": round(flops / t / 1e12, 1), "sweep": True}), flush=True)
        if best is None or t < best[0]:
            best = (t, cfg, err)
    return best


def _describe(cfg):
    """A sweep setting as JSON: ours are dicts, jax's example's a TuningConfig."""
    if isinstance(cfg, dict):
        return cfg
    return {"wg": str(cfg.wg_dimension), "minor": str(cfg.grid_minor_dim),
            "width": cfg.grid_tile_width}


def step_dot(a, b, transpose_a=False, transpose_b=False, c=None):
    """XLA's GEMM as the training step runs it: a bf16 einsum output (cuBLAS accumulates in
    fp32 and writes bf16), and an input-gradient sum as a bf16 add that XLA folds into the
    GEMM (beta = 1). Timing matmul_reference's fp32 output and separate cast instead made
    XLA look 1-15% slower than it runs in the step (docs/performance.md, eighth session)."""
    out = jnp.dot(a.T if transpose_a else a, b.T if transpose_b else b)
    return out if c is None else out + c


def bench_shape(name, m, k, n, impls, quick):
    """XLA's GEMM, jax's example GEMM (`mgpu`, forward layout only) and ours (`ours`, all
    three layouts, plus nt with c added in the epilogue), each checked against XLA's result."""
    from kernels import matmul_mgpu
    flops, rows = 2.0 * m * n * k, []
    for layout, (ta, tb) in LAYOUTS.items() if "ours" in impls else [("nn", LAYOUTS["nn"])]:
        a, b = jax.block_until_ready(_layout_operands(m, k, n, layout))
        ref = jax.jit(functools.partial(matmul_mgpu.matmul_reference, transpose_a=ta,
                                        transpose_b=tb))(a, b)
        xla = jax.jit(functools.partial(step_dot, transpose_a=ta, transpose_b=tb))
        key = {"shape": name, "layout": layout, "mkn": [m, k, n]}

        def timed(impl, t, **extra):
            return {**key, "impl": impl, "ms": round(t * 1e3, 4),
                    "tflops": round(flops / t / 1e12, 1), **extra}

        def ours(cfg):  # our kernel at a setting, with or without c
            return lambda a, b, *c: matmul_mgpu.matmul(a, b, *c, transpose_a=ta,
                                                       transpose_b=tb, tuning=cfg)

        if "xla" in impls:
            rows.append(timed("xla", time_fn(xla, (a, b))))
        if "mgpu" in impls and layout == "nn":
            from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
            best = _sweep({**key, "impl": "mgpu"}, _mgpu_configs(hm, quick),
                          lambda cfg: lambda a, b: hm.matmul(a, b, None, cfg), (a, b), ref, flops)
            if best:
                rows.append(timed("mgpu", best[0], max_rel_err=round(best[2], 5),
                                  config=_describe(best[1])))
        if "ours" not in impls:
            continue
        best = _sweep({**key, "impl": "ours"}, _our_configs(quick), ours, (a, b), ref, flops)
        if best:
            rows.append(timed("ours", best[0], max_rel_err=round(best[2], 5), config=best[1],
                              tuned_wg=matmul_mgpu.tuning_for(a.shape, b.shape, ta, tb)["wg"]))
        if best and layout == "nt":  # + c added in the epilogue (the input-gradient sums)
            key["layout"] = "nt+c"
            c = jax.random.normal(jax.random.key(9), (m, n), jnp.bfloat16)
            ref_c = jax.jit(lambda a, b, c: matmul_mgpu.matmul_reference(a, b, False, True, c))(
                a, b, c)
            if "xla" in impls:
                xla_c = jax.jit(lambda a, b, c: step_dot(a, b, False, True, c))
                rows.append(timed("xla", time_fn(xla_c, (a, b, c))))
            best_c = _sweep({**key, "impl": "ours"}, [best[1]], ours, (a, b, c), ref_c, flops)
            if best_c:
                rows.append(timed("ours", best_c[0], max_rel_err=round(best_c[2], 5),
                                  config=best_c[1]))
    return rows


def bench_swiglu(m):
    """XLA's unfused SwiGLU forward against its two GEMMs: the product's own cost."""
    x, wg = _operands(m, D, F, seed=1)
    _, wu = _operands(m, D, F, seed=2)
    gemms = jax.jit(lambda x, wg, wu: (x @ wg, x @ wu))
    swiglu = jax.jit(lambda x, wg, wu: (x @ wg, x @ wu, jax.nn.silu(x @ wg) * (x @ wu)))
    t_g, t_s = time_fn(gemms, (x, wg, wu)), time_fn(swiglu, (x, wg, wu))
    return {"shape": "swiglu_fwd", "m": m, "two_gemms_ms": round(t_g * 1e3, 4),
            "with_product_ms": round(t_s * 1e3, 4), "product_ms": round((t_s - t_g) * 1e3, 4)}


WGRAD = {"attn_proj": (D, D), "mlp_up": (D, F), "mlp_down": (F, D)}


def _wgrad_variants():
    """name -> f(x (tokens, d_in), dy (tokens, d_out), acc (d_in, d_out) fp32) -> fp32-sized
    result; every variant computes the same dW (the "+ acc" ones plus acc)."""
    def dw(x, dy, swapped, f32):  # swapped: dW^T = dy^T x, transposed back
        kw = {"preferred_element_type": jnp.float32} if f32 else {}
        return (jnp.einsum("tf,td->fd", dy, x, **kw).T if swapped
                else jnp.einsum("td,tf->df", x, dy, **kw))

    out = {}
    for t, tag in ((False, ""), (True, "_swapped")):
        out["bf16" + tag] = lambda x, dy, acc, t=t: dw(x, dy, t, False)
        out["f32" + tag] = lambda x, dy, acc, t=t: dw(x, dy, t, True)
        out["f32_acc" + tag] = lambda x, dy, acc, t=t: acc + dw(x, dy, t, True)
        out["bf16_widen_acc" + tag] = lambda x, dy, acc, t=t: acc + dw(x, dy, t, False).astype(
            jnp.float32)
    return out


def bench_wgrad(m):
    """The weight-gradient GEMM's variants (see the module docstring) at M = m tokens, each
    against the forward GEMM x @ w of the same FLOPs, with and without XLA's Triton GEMMs."""
    rows, variants = [], _wgrad_variants()
    on_gpu = jax.devices()[0].platform == "gpu"
    for name, (k, n) in WGRAD.items():
        ka, kb, kc = jax.random.split(jax.random.key(3), 3)
        x = jax.random.normal(ka, (m, k), jnp.bfloat16)
        dy = jax.random.normal(kb, (m, n), jnp.bfloat16)
        acc = jax.random.normal(kc, (k, n), jnp.float32)
        w = acc.astype(jnp.bfloat16)
        flops = 2.0 * m * k * n
        ref = jnp.einsum("td,tf->df", x, dy, preferred_element_type=jnp.float32)
        fwd = jax.jit(lambda x, w: x @ w)
        t = time_fn(fwd, (x, w))
        rows.append({"shape": "wgrad_" + name, "variant": "forward x @ w", "mkn": [m, k, n],
                     "ms": round(t * 1e3, 4), "tflops": round(flops / t / 1e12, 1)})
        for triton in (True, False) if on_gpu else (True,):
            for v, f in variants.items():
                g = jax.jit(f).lower(x, dy, acc).compile(
                    {"xla_gpu_enable_triton_gemm": triton} if on_gpu else None)
                got = g(x, dy, acc) - (acc if "acc" in v else 0)
                err = rel_err(got, ref)
                t = time_fn(g, (x, dy, acc))
                rows.append({"shape": "wgrad_" + name, "variant": v, "triton_gemm": triton,
                             "mkn": [m, k, n], "ms": round(t * 1e3, 4),
                             "tflops": round(flops / t / 1e12, 1), "max_rel_err": round(err, 5)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default="xla,mgpu,ours", help="comma list of xla, mgpu, ours")
    ap.add_argument("--tokens", type=int, default=32768, help="M: tokens per step (batch x seq)")
    ap.add_argument("--quick", action="store_true", help="mgpu: two configs per shape")
    ap.add_argument("--shapes", default="attn_proj,mlp_up,mlp_down,lm_head_chunk,swiglu",
                    help="comma list of the shapes to run (and swiglu)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    impls, wanted = set(a.impls.split(",")), a.shapes.split(",")
    known = [*shapes(a.tokens), "swiglu", "wgrad"]
    if unknown := [w for w in wanted if w not in known]:
        ap.error(f"--shapes: unknown {unknown}; choose from {known}")
    if not impls <= {"xla", "mgpu", "ours"}:
        ap.error(f"--impls={a.impls}: choose from xla, mgpu, ours")
    if impls & {"mgpu", "ours"} and jax.devices()[0].platform != "gpu":
        ap.error(f"--impls={a.impls}: mgpu and ours need a Hopper GPU; use --impls=xla here")

    def rows():  # produced one by one, so each prints as soon as it is measured
        for name, (m, k, n) in shapes(a.tokens).items():
            if name in wanted:
                yield from bench_shape(name, m, k, n, impls, a.quick)
        if "swiglu" in wanted:
            yield bench_swiglu(a.tokens)
        if "wgrad" in wanted:
            yield from bench_wgrad(a.tokens)

    report(rows(), a.out, tokens=a.tokens)


if __name__ == "__main__":
    main()
