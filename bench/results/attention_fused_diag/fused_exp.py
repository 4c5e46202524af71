import os, sys, time, statistics, jax, jax.numpy as jnp
from bench.attention import inputs, time_fn, rel_err
from kernels import flash_attention_mgpu as fm
B,T,N,K,H = 8,4096,16,16,128
q,k,v,do = inputs(B,T,N,K,H)
m1 = 2*B*N*T*T*H/2
out, lse = jax.jit(lambda *a: fm.forward(*a, None, block_q=128, block_k=128))(q,k,v)
ref = None
for spec in sys.argv[1].split(","):
    mode, _, regs = spec.partition("@")
    os.environ["FUSED_DQ"] = mode
    os.environ["FUSED_REGS"] = regs or "232"
    os.environ["PROD_REGS"] = "24" if regs == "240" else "40"
    try:
        f = jax.jit(lambda *a: fm._bwd_fused(*a))
        t = time_fn(f, (q,k,v,do,out,lse))
        g = f(q,k,v,do,out,lse)
        if ref is None: ref = g
        err = max(rel_err(a, b) for a, b in zip(g, ref))
        print(spec, "ms %.3f" % (t*1e3), "hw5 %.1f" % (5*m1/t/1e12), "err_vs_first %.4f" % err, flush=True)
    except Exception as e:
        print(spec, "ERR", str(e)[:300], flush=True)
