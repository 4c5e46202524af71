import os, sys, jax
from bench.attention import inputs
from kernels import flash_attention_mgpu as fm
q,k,v,do = inputs(1,256,2,2,128)
out, lse = jax.jit(lambda *a: fm.forward(*a, None, block_q=128, block_k=128))(q,k,v)
for mode in sys.argv[1].split(","):
    os.environ.setdefault("FUSED_DQ", mode); os.environ["FUSED_DQ"] = os.environ["FUSED_DQ"] if len(sys.argv) > 2 else mode
    print("=== MODE", mode, flush=True)
    jax.block_until_ready(jax.jit(lambda *a: fm._bwd_fused(*a))(q,k,v,do,out,lse))
