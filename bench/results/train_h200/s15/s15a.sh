#!/bin/bash
# Session 15, call A (H200 only: the real step needs 117 GiB): the real configs/1b.py (global
# 512, micro 16, remat none, bf16 logits; today's defaults) beside transformers + torch.compile
# in one process, then the weight-gradient GEMM's variants at the micro-batch's 65,536 tokens.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-260} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-1} --warmup=1 \
  --transformers=compile --variant=a1_main:$V --out=$OUT/a1_main_hf.json > $OUT/a1_main_hf.log 2>&1
tail -4 $OUT/a1_main_hf.log | cut -c1-400
TOKENS=65536 bash bench/results/train_h200/s15/s15w.sh  # TG: its time limit
