#!/bin/bash
# Session 16, call C: input_grad_sum gemm with every GEMM on cuBLAS from the start
# (train.gpu_triton_gemm=False: no Triton GEMM fusions, so XLA's GEMM rewriter sees the raw
# dots and can fold each `GEMM + running sum` into the GEMM as its C), against autodiff's
# sums, at the accumulation proxy (GB, MB, remat none, bf16 logits). Rows c1 and c2 dump the
# optimised HLO and count the [tokens, d_model] adds left (sums.py). H100: GB=16 MB=8.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16"
run() { timeout $3 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > /tmp/$1.log 2>&1; tail -${TL:-1} /tmp/$1.log | cut -c1-330; }
# (logs stay in /tmp, their last lines print: a call brings back at most 8 files)
dump() { XLA_FLAGS="--xla_dump_to=/tmp/hlo_$1 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" run "$@"
  python3 bench/results/train_h200/s16/sums.py /tmp/hlo_$1 > $OUT/$1_sums.txt; cat $OUT/$1_sums.txt; }
NT=",train.gpu_triton_gemm=False"
dump c1_nt_gemm "$NT,model.input_grad_sum=gemm" ${T1:-140}
dump c2_nt_ad "$NT,model.input_grad_sum=autodiff" ${TD:-125}
run c3_gemm ",train.gpu_triton_gemm=True,model.input_grad_sum=gemm" ${T:-95}
[ "${C4:-1}" = 1 ] && run c4_nt_gemm "$NT,model.input_grad_sum=gemm" ${T:-95}
