#!/bin/bash
# Session 12, H200 call: the one-pass SwiGLU and QK-norm+RoPE backwards (model.mlp_impl / rope_impl = pallas)
# against the defaults at the accumulation proxy (global 32, micro 16), two alternating pairs; then the real
# configs/1b.py (global 512, micro 16, remat none, bf16 logits; fp32 weight grads, the default since the eleventh
# session) beside transformers + torch.compile. Each row its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
B="train.global_batch_size=32,train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout ${T:-80} python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-200; }
run f1_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run f1_ctl ""
run f2_both ",model.mlp_impl=pallas,model.rope_impl=pallas"
run f2_ctl ""
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout 250 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 --transformers=compile \
  --variant=f0_g512_m16_none:$V --out=$OUT/f0_hf_g512.json > $OUT/f0_hf_g512.log 2>&1; tail -3 $OUT/f0_hf_g512.log | cut -c1-200
grep -ho '"gemm_kernels": {[^}]*}' $OUT/*.json | sort | uniq -c
