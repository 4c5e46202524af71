#!/bin/bash
# Session 14, call B (H200 only: the step needs 117 GiB): the real configs/1b.py (global 512,
# micro 16, remat none, bf16 logits; today's defaults, i.e. the Pallas norm, QK-norm+RoPE,
# SwiGLU and loss kernels) beside transformers + torch.compile in the same process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-300} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=${STEPS:-2} --warmup=1 \
  --transformers=compile --variant=b1_main:$V --out=$OUT/b1_main_hf.json > $OUT/b1_main_hf.log 2>&1
tail -4 $OUT/b1_main_hf.log | cut -c1-330
nvidia-smi --query-gpu=name,power.limit --format=csv
