#!/bin/bash
# Session 13, call A: the SwiGLU backwards in the step at the accumulation proxy (global GB, micro MB,
# remat none, bf16 logits; fp32 weight grads), each row its own process, in the order
#   ctl, both, grouped, [grouped, both,] ctl (the bracketed two only with ROWS=6, the default)
# both = mlp_impl pallas + rope_impl pallas; grouped = mlp_impl pallas_grouped + rope_impl pallas.
# First bench/swiglu.py --gated (the MLP's first half alone, three ways). H200: GB=32 MB=16 (default); H100: GB=16 MB=8.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
timeout 45 python3 bench/swiglu.py --gated --out=$OUT/swiglu.json > $OUT/swiglu.log 2>&1; grep '"ms"' $OUT/swiglu.log | cut -c1-150
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout ${T:-95} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-330; }
BOTH=",model.mlp_impl=pallas,model.rope_impl=pallas"
GRP=",model.mlp_impl=pallas_grouped,model.rope_impl=pallas"
run a1_ctl ""
run a2_both "$BOTH"
run a3_grp "$GRP"
if [ "${ROWS:-6}" = 6 ]; then run a4_grp "$GRP"; run a5_both "$BOTH"; fi
run a6_ctl ""
grep -ho '"gemm_kernels": {[^}]*}' $OUT/*.json | sort | uniq -c
