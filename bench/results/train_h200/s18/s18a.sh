#!/bin/bash
# Session 18, call A (H200 only: the real step needs 117 GiB): the real configs/1b.py (global 512,
# micro 16, remat none, bf16 logits, today's defaults) first, then transformers + torch.compile
# at batch 8 in a process of its own on the same machine, so the ratio is measured in one call
# even if the budget cuts the second part short (the first part's JSON is written by then).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
date -u
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-200} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-1} --warmup=1 \
  --variant=a1_main:$V --out=$OUT/a1_main.json > $OUT/a1_main.log 2>&1
tail -3 $OUT/a1_main.log | cut -c1-600
date -u
timeout ${TH:-120} python3 bench/transformers_step.py --config=configs/1b.py --seq=4096 --batch=8 \
  --steps=${HS:-5} --warmup=3 --compile > $OUT/a2_hf.log 2>&1
tail -2 $OUT/a2_hf.log | cut -c1-600
date -u
