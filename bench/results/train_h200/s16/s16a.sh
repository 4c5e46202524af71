#!/bin/bash
# Session 16, call A (H200 only: the real step needs 117 GiB; not run in session 16): the real
# configs/1b.py (global 512, micro 16, remat none, bf16 logits; today's defaults: input_grad_sum
# auto = gemm, gpu_triton_gemm False) beside transformers + torch.compile in one process, then
# the fifteenth session's defaults (autodiff's sums, Triton GEMMs on) in a process of its own
# (skip it with AD=0), then (LC=1) today's defaults with train.loss_chunks=4: 16,384-token LM-head
# chunks at micro-batch 16, for the LM head's weight-gradient GEMM (~+3.3 GiB of logits).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-280} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-1} --warmup=1 \
  --transformers=compile --variant=a1_main:$V --out=$OUT/a1_main_hf.json > $OUT/a1_main_hf.log 2>&1
tail -4 $OUT/a1_main_hf.log | cut -c1-400
if [ "${AD:-1}" != 0 ]; then
  timeout ${TA:-200} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-1} --warmup=1 \
    --variant=a2_s15:$V,model.input_grad_sum=autodiff,train.gpu_triton_gemm=True --out=$OUT/a2_s15.json > $OUT/a2_s15.log 2>&1
  tail -2 $OUT/a2_s15.log | cut -c1-400
fi
if [ "${LC:-0}" = 1 ]; then
  timeout ${TC:-200} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-1} --warmup=1 \
    --variant=a3_chunks4:$V,train.loss_chunks=4 --out=$OUT/a3_chunks4.json > $OUT/a3_chunks4.log 2>&1
  tail -2 $OUT/a3_chunks4.log | cut -c1-400
fi
