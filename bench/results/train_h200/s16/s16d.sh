#!/bin/bash
# Session 16, call D: one more pair for configs/1b.py's train.gpu_triton_gemm=False, both with
# input_grad_sum gemm: Triton GEMMs on (d1), off (d2, today's default), at the accumulation
# proxy (GB, MB, remat none, bf16 logits), each row its own process. H100: GB=16 MB=8.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16,model.input_grad_sum=gemm"
run() { timeout $3 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > /tmp/$1.log 2>&1; tail -1 /tmp/$1.log | cut -c1-330; }
run d1_gemm ",train.gpu_triton_gemm=True" ${T1:-130}
run d2_nt_gemm ",train.gpu_triton_gemm=False" ${T:-95}
