#!/bin/bash
# Session 12, call 2: model.mlp_impl / rope_impl = pallas in the step (init now takes XLA's path), tuned tiles;
# accumulation proxy GB/MB, remat none, bf16 logits, each row its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
timeout 40 python3 bench/rmsnorm.py --only=qk_norm_rope --out=$OUT/rmsnorm.json > $OUT/rmsnorm.log 2>&1; tail -2 $OUT/rmsnorm.log
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout ${T:-85} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=4 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-300; }
run e1_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run e1_ctl ""
run e2_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run e2_ctl ""
run e3_mlp ",model.mlp_impl=pallas"
run e3_rope ",model.rope_impl=pallas"
