#!/bin/bash
# Session 17, call B (an H100 proxy of the real config's LM head): train.loss_chunks, i.e. the
# tokens per LM-head chunk (B*T/chunks: the M of the logits GEMM, the K of the LM head's weight
# gradient), at the accumulation proxy (GB, MB, remat none, bf16 logits, today's defaults), each
# row its own process. At MB=8: 8 chunks = 4,096 tokens (the proxy's default), 4 = 8,192 (what
# the real config's micro-batch 16 runs with its 8), 2 = 16,384 (what loss_chunks=4 gives it).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
B="train.global_batch_size=${GB:-16},train.micro_batch_size=${MB:-8},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout $3 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B,train.loss_chunks=$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-330; }
run b1_c4 4 ${T1:-130}
run b2_c2 2 ${T:-95}
run b3_c8 8 ${T:-95}
run b4_c4 4 ${T:-95}
run b5_c2 2 ${T:-95}
