#!/bin/bash
# Session 14, call A (H200): the one-pass norm forwards standalone, then the real configs/1b.py
# (global 512, micro 16, remat none, bf16 logits; defaults: Pallas norm / QK-norm+RoPE / SwiGLU
# backwards) beside transformers + torch.compile, then the same with model.norm_fwd_impl=pallas.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
if [ "${NORMS:-1}" = 1 ]; then
  timeout 90 python3 bench/rmsnorm.py --tokens=65536 --only=post_norm_add,qk_norm_rope \
    --out=$OUT/rmsnorm.json > $OUT/rmsnorm.log 2>&1; grep '"impl"' $OUT/rmsnorm.log | cut -c1-200
fi
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout ${T:-280} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 \
  --transformers=compile --variant=a1_main:$V --out=$OUT/a1_main_hf.json > $OUT/a1_main_hf.log 2>&1
tail -4 $OUT/a1_main_hf.log | cut -c1-330
timeout ${T2:-200} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 \
  --variant=a2_fwd:$V,model.norm_fwd_impl=pallas --out=$OUT/a2_fwd.json > $OUT/a2_fwd.log 2>&1
tail -1 $OUT/a2_fwd.log | cut -c1-330
