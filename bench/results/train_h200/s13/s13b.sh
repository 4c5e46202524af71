#!/bin/bash
# Session 13, call 2: where the time goes now, 2 micro-batches of 16 (remat none, bf16 logits), with the
# one-pass SwiGLU and QK-norm+RoPE backwards (PROF_SET adds overrides), by-source table.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
S="--set=train.global_batch_size=32 --set=train.micro_batch_size=16 --set=model.remat=none --set=train.loss_logits_dtype=bfloat16"
timeout ${T:-200} python3 bench/kernel_profile.py train --config=configs/1b.py $S ${PROF_SET} \
  --no-command-buffers --top=40 --steps=2 --out=$OUT/prof.json > $OUT/prof.log 2>&1
grep -A70 "by source" $OUT/prof.log | cut -c1-150 | head -75; head -8 $OUT/prof.log
