"""Mosaic GPU attention kernels piece by piece on one Hopper GPU: correctness against
`reference_attention`, then the time of each kernel (forward, dq + delta, dk/dv) per tile.

    PYTHONPATH=$PWD python3 bench/attention_parts.py [--out parts.json]

B=8, T=4096, 16 heads, head_dim 128, bf16. "hw TFLOP/s" counts the matmuls each kernel
really runs (causal): forward 2, dq 3 (QK^T, dO V^T, dS K), dk/dv 4 (KQ^T, V dO^T, P^T dO,
dS^T Q), the fused backward 5 (dk/dv's and dS K), each 2*B*N*T*T*H/2 FLOPs. The "chain_*"
rows run forward + backward in one jit (two-kernel, fused, and cuDNN's for comparison) and
count the credited 2 + 5 matmuls. Kernels that hang would stall here: run it under `timeout`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from bench.attention import fwd_bwd_fn, inputs, rel_err, time_fn
from kernels import flash_attention, flash_attention_mgpu as fm, reference_attention


def check(B, T, N, K, H):
    q, k, v, do = inputs(B, T, N, K, H, seed=2)
    ours = jax.jit(lambda *a: jax.vjp(lambda *x: flash_attention(*x, backend="mgpu"), *a))
    ref = jax.jit(lambda *a: jax.vjp(reference_attention, *a))
    (o1, vjp1), (o2, vjp2) = ours(q, k, v), ref(q, k, v)
    errs = {"out": rel_err(o1, o2)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), vjp1(do), vjp2(do))})
    return errs


def _chain(bwd):
    """Forward + backward kernels in one program, as the training step runs them."""
    def f(q, k, v, do):
        out, lse = fm.forward(q, k, v, None, block_q=128, block_k=128)
        if bwd == "fused":
            return (out, *fm._bwd_fused(q, k, v, do, out, lse))
        dq, di = fm._dq(q, k, v, do, out, lse)
        return (out, dq, *fm._dkv(q, k, v, do, lse, di))
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_parts.json")
    ap.add_argument("--kernels",
                    default="fwd,fwd_no_overlap,dq,dkv,bwd_fused,bwd_fused_no_overlap,"
                            "chain_two_kernel,chain_fused,chain_cudnn",
                    help="comma list of the kernels to check and time")
    args = ap.parse_args()
    wanted = args.kernels.split(",")
    known = ap.get_default("kernels").split(",")
    if unknown := [w for w in wanted if w not in known]:
        ap.error(f"--kernels: unknown {unknown}; choose from {','.join(known)}")
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "check": {},
              "parts": []}
    default_bwd = fm.TUNING["bwd"]
    for bwd in [b for b, ks in (("two_kernel", {"dq", "dkv", "chain_two_kernel"}),
                                   ("fused", {"bwd_fused", "bwd_fused_no_overlap",
                                              "chain_fused"}))
                if ks & set(wanted)]:
        fm.TUNING["bwd"] = bwd
        for shape in ((1, 256, 2, 2, 128), (2, 1000, 8, 2, 128), (2, 512, 4, 4, 64)):
            key = "{}_B{}_T{}_N{}_K{}_H{}".format(bwd, *shape)
            result["check"][key] = errs = check(*shape)
            print("check vs reference", key, errs, flush=True)
    fm.TUNING["bwd"] = default_bwd
    B, T, N, K, H = 8, 4096, 16, 16, 128
    q, k, v, do = inputs(B, T, N, K, H)
    m1 = 2 * B * N * T * T * H / 2
    out, lse = jax.jit(lambda *a: fm.forward(*a, None, block_q=128, block_k=128))(q, k, v)
    _, di = jax.jit(fm._dq)(q, k, v, do, out, lse)
    plan = [("fwd", "fwd", 2, [(64, 128, 2), (64, 64, 2)],
             lambda: jax.jit(lambda *a: fm.forward(*a, None, block_q=128,
                                                  block_k=fm.TUNING["fwd"][1])), (q, k, v)),
            # the forward without its softmax pipelined under the PV matmul (fwd_overlap=False)
            ("fwd_no_overlap", "fwd_overlap", 2, [False],
             lambda: jax.jit(lambda *a: fm.forward(*a, None, block_q=128, block_k=128)),
             (q, k, v)),
            ("dq", "dq", 3, [(64, 64, 2), (64, 128, 2)], lambda: jax.jit(fm._dq),
             (q, k, v, do, out, lse)),
            ("dkv", "dkv", 4, [(64, 64, 2), (64, 64, 3)], lambda: jax.jit(fm._dkv),
             (q, k, v, do, lse, di)),
            # the fused backward (delta, one kernel, the fp32 dQ cast) against dq + dk/dv
            ("bwd_fused", "dkv", 5, [(64, 64, 2)], lambda: jax.jit(fm._bwd_fused),
             (q, k, v, do, out, lse)),
            # the same with dQ stored only after dK's matmul too (fused_dq_overlap=False)
            ("bwd_fused_no_overlap", "fused_dq_overlap", 5, [False],
             lambda: jax.jit(lambda *a: fm._bwd_fused(*a)), (q, k, v, do, out, lse)),
            ("chain_two_kernel", "dkv", 7, [(64, 64, 2)], lambda: jax.jit(_chain("two_kernel")),
             (q, k, v, do)),
            ("chain_fused", "dkv", 7, [(64, 64, 2)], lambda: jax.jit(_chain("fused")),
             (q, k, v, do)),
            ("chain_cudnn", "dkv", 7, [(64, 64, 2)], lambda: jax.jit(fwd_bwd_fn("cudnn")),
             (q, k, v, do))]
    for label, kind, n_mm, tiles, make, operands in [p for p in plan if p[0] in wanted]:
        default = fm.TUNING[kind]
        for tile in tiles:
            fm.TUNING[kind] = tile
            try:
                t = time_fn(make(), operands)
                row = {"kernel": label, "tiles": tile, "ms": t * 1e3,
                       "hw_tflops": n_mm * m1 / t / 1e12}
            except Exception as e:  # e.g. a tile that exceeds shared memory
                row = {"kernel": label, "tiles": tile, "error": str(e).splitlines()[0][:200]}
            result["parts"].append(row)
            print(row, flush=True)
        fm.TUNING[kind] = default
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
