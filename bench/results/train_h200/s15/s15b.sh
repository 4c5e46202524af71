#!/bin/bash
# Runs at commit 90ceb5d (model.post_norm_impl was removed in the next commit: not a lever).
# Session 15, call B: model.post_norm_impl (the post-norms' residual cotangent handed back by the
# norm kernel as an aliased output, so XLA folds the residual sums into the input-gradient
# GEMMs) against today's defaults, at the accumulation proxy (global GB, micro MB, remat none,
# bf16 logits), each row its own process, alternating: ctl, pn, ctl, pn. Then a by-source
# profile of pn (PROF=1). H200: GB=32 MB=16 (default); H100: GB=16 MB=8.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout ${T:-95} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-330; }
PN=",model.post_norm_impl=pallas"
run b1_ctl ""
run b2_pn "$PN"
run b3_ctl ""
run b4_pn "$PN"
if [ -n "$PROF" ]; then
  S="--set=train.global_batch_size=${GB:-32} --set=train.micro_batch_size=${MB:-16} --set=model.remat=none --set=train.loss_logits_dtype=bfloat16"
  timeout ${TP:-150} python3 bench/kernel_profile.py train --config=configs/1b.py $S --set=model.post_norm_impl=pallas \
    --no-command-buffers --top=40 --steps=2 --out=$OUT/prof_pn.json > $OUT/prof_pn.log 2>&1
  head -8 $OUT/prof_pn.log; grep -E "add_any|by source|post_.*norm" $OUT/prof_pn.log | cut -c1-150
fi
