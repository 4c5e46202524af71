#!/bin/bash
# Session 15: the weight-gradient GEMM's variants alone (bench/gemm.py --shapes=wgrad) at the
# step's micro-batch sizes (32,768 and 65,536 tokens), on whichever Hopper card came.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
for M in ${TOKENS:-65536 32768}; do
timeout ${TG:-150} python3 bench/gemm.py --impls=xla --tokens=$M --shapes=wgrad --out=$OUT/wgrad_$M.json \
  > $OUT/wgrad_$M.log 2>&1
grep -v '^{"date' $OUT/wgrad_$M.log | python3 -c "
import json,sys
for l in sys.stdin:
    try: r=json.loads(l)
    except Exception: print(l.rstrip()[:300]); continue
    print(r.get('shape'), r['mkn'][0], r.get('variant'), r.get('triton_gemm',''), r.get('ms'), r.get('tflops'), r.get('max_rel_err',''))"
done
