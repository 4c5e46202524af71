#!/bin/bash
# Session 11, call 1: fp32 weight-gradient GEMMs vs bf16 autodiff, accumulation proxy (global 32, micro 16).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv > $OUT/gpu.txt
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout 170 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=5 --warmup=1 \
  --variant=$1:$B,model.weight_grad_dtype=$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -3 $OUT/$1.log; }
run a1_bf16 bfloat16
run a1_f32 float32
run a2_bf16 bfloat16
run a2_f32 float32
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false run a3_f32_notriton float32
