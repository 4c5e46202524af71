#!/bin/bash
# Session 13, call C: the real configs/1b.py (global 512, micro 16, remat none, bf16 logits, fp32 weight
# grads; since this session rope_impl / mlp_impl auto = the one-pass Pallas backwards) plus the overrides
# in $X (e.g. ",model.mlp_impl=pallas_grouped"), beside transformers + torch.compile in the same process;
# then, if CTL=1, the same with both backwards on XLA (the twelfth session's defaults).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-280} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 \
  --transformers=compile --variant=c1_best:$V$X --out=$OUT/c1_best_hf.json > $OUT/c1_best_hf.log 2>&1
tail -4 $OUT/c1_best_hf.log | cut -c1-330
if [ "${CTL:-0}" = 1 ]; then
  timeout 200 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 \
    --variant=c2_ctl:$V,model.mlp_impl=xla,model.rope_impl=xla --out=$OUT/c2_ctl.json > $OUT/c2_ctl.log 2>&1; tail -1 $OUT/c2_ctl.log | cut -c1-330
fi
