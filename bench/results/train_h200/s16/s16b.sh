#!/bin/bash
# Session 16, call B: model.input_grad_sum gemm (the residual's cotangent summed in the q/k/v
# and gate/up groups' custom VJP, each step `GEMM + running sum`, which XLA folds into the GEMM
# as its C) against autodiff's sums, at the accumulation proxy (global GB, micro MB, remat none,
# bf16 logits), each row its own process, alternating; b3/b4 count the optimised HLO's
# residual-sized adds (sums.py). Then a by-source profile of gemm
# (PROF=1). H200: GB=32 MB=16 (default); H100: GB=16 MB=8. T1: the first row's limit (a fresh
# machine's first process compiles slower).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
B="train.global_batch_size=${GB:-32},train.micro_batch_size=${MB:-16},model.remat=none,train.loss_logits_dtype=bfloat16,train.gpu_triton_gemm=True"  # the default when it ran
run() { timeout $3 python3 bench/train_step.py --config=configs/1b.py --seq=4096 --steps=3 --warmup=1 \
  --variant=$1:$B$2 --out=$OUT/$1.json > $OUT/$1.log 2>&1; tail -1 $OUT/$1.log | cut -c1-330; }
# rows b3 and b4 also dump the step's optimised HLO; sums.py counts its [tokens, d_model] adds
dump() { XLA_FLAGS="--xla_dump_to=/tmp/hlo_$1 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" run "$@"
  python3 bench/results/train_h200/s16/sums.py /tmp/hlo_$1 | tee $OUT/$1_sums.txt; }
AD=",model.input_grad_sum=autodiff" GS=",model.input_grad_sum=gemm"
run b1_ad "$AD" ${T1:-130}
run b2_gemm "$GS" ${T:-95}
dump b3_ad "$AD" ${T:-95}
dump b4_gemm "$GS" ${T:-95}
if [ -n "$PROF" ]; then
  S="--set=train.global_batch_size=${GB:-32} --set=train.micro_batch_size=${MB:-16} --set=model.remat=none --set=train.loss_logits_dtype=bfloat16 --set=train.gpu_triton_gemm=True"
  timeout ${TP:-150} python3 bench/kernel_profile.py train --config=configs/1b.py $S --set=model.input_grad_sum=gemm \
    --no-command-buffers --top=40 --steps=2 --out=$OUT/prof_gemm.json > $OUT/prof_gemm.log 2>&1
  head -8 $OUT/prof_gemm.log; grep -E "add|by source" $OUT/prof_gemm.log | cut -c1-170
fi
