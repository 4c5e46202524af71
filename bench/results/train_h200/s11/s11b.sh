#!/bin/bash
# Session 11, call 2: the real configs/1b.py (global 512, micro 16, remat none, bf16 logits) with
# fp32 weight grads (the new default), beside transformers + torch.compile; then cuBLAS-only GEMMs.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
V="train.micro_batch_size=16,model.remat=none,train.loss_logits_dtype=bfloat16"
timeout 290 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 --transformers=compile \
  --variant=b1_g512_m16_none:$V --out=$OUT/b1_hf_g512_m16_none.json > $OUT/b1_hf_g512_m16_none.log 2>&1; tail -4 $OUT/b1_hf_g512_m16_none.log
timeout 250 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=2 --warmup=1 \
  --variant=b2_g512_m16_none_notriton:$V,train.gpu_triton_gemm=false --out=$OUT/b2_notriton.json > $OUT/b2_notriton.log 2>&1; tail -3 $OUT/b2_notriton.log
grep -h gemm_kernels $OUT/*.json
