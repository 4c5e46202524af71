#!/bin/bash
# Session 11, call 3 (H100): XLA's Triton GEMMs on (XLA's default) against off (train.gpu_triton_gemm=false),
# three alternating pairs, each row its own process; accumulation proxy: 2 micro-batches of 8, remat none, bf16 logits.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
B="train.global_batch_size=16,train.micro_batch_size=8,model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout 100 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=5 --warmup=1 \
  --variant=$1:$B,train.gpu_triton_gemm=$2 --out=$OUT/$1.json > /tmp/$1.log 2>&1; tail -1 /tmp/$1.log; python3 -c "import json; r=json.load(open('$OUT/$1.json'))['results'][0]; print(r.get('gemm_kernels'), r.get('gpu_clock'))"; }
for i in $(seq ${PAIRS:-3}); do run c${i}_triton true; run c${i}_cublas false; done
