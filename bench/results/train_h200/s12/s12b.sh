#!/bin/bash
# Session 12: the one-pass SwiGLU backward (model.mlp_impl) and QK-norm+RoPE backward (model.rope_impl):
# standalone benches with sweeps, then the step (accumulation proxy GB/MB, remat none, bf16 logits), each row its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
S=bench/results/train_h200/s12
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv > $OUT/gpu.txt
timeout 150 python3 bench/swiglu.py --sweep --out=$OUT/swiglu.json > $OUT/swiglu.log 2>&1; head -5 $OUT/swiglu.log | cut -c1-200
python3 $S/best.py $OUT/swiglu.json
timeout 100 python3 bench/rmsnorm.py --only=qk_norm,qk_norm_rope --sweep --out=$OUT/rmsnorm.json > $OUT/rmsnorm.log 2>&1; grep -v tuning $OUT/rmsnorm.log | tail -5
python3 $S/best.py $OUT/rmsnorm.json
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout ${T:-110} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=5 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-220; }
run d1_ctl ""
run d1_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run d2_ctl ""
run d2_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run d3_mlp ",model.mlp_impl=pallas"
run d3_rope ",model.rope_impl=pallas"
