"""Counts, in an XLA GPU dump's optimised train_step module, the element-wise fusions that
add [tokens, d_model] bf16 arrays (the residual cotangent's sums) and the cuBLAS GEMMs of that
output shape that take a C (beta = 1), by the jax op that made them.

    python3 sums.py DUMP_DIR [d_model]
"""
import collections
import glob
import re
import sys

d_model = sys.argv[2] if len(sys.argv) > 2 else "2048"
files = sorted(glob.glob(f"{sys.argv[1]}/*train_step*after_optimizations.txt"), key=len)
if not files:
    sys.exit(f"no *train_step*after_optimizations.txt under {sys.argv[1]}")
text = open(files[0]).read()
shape = re.compile(r"= \(?bf16\[(?:\d+,)*\d+," + d_model + r"\]")
op_name = re.compile(r'op_name="([^"]*)"')
ops, comp = collections.defaultdict(dict), None  # computation -> {jax op: is the ROOT}
for line in text.splitlines():
    head = re.match(r"%?([\w.\-]+) \(.*\{$", line)
    if head:
        comp = head.group(1)
    elif comp and op_name.search(line):
        ops[comp][op_name.search(line).group(1).split("/")[-1]] = "ROOT" in line
root_op = {c: next((o for o, r in d.items() if r), "+".join(sorted(d))) for c, d in ops.items()}
fusions, gemms = collections.Counter(), collections.Counter()
for line in text.splitlines():
    if not shape.search(line):
        continue
    name = op_name.search(line)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    name = name.group(1) if name else root_op.get(called.group(1) if called else None, "?")
    name = name.split("/")[-1]
    if " fusion(" in line and "kind=kLoop" in line:
        fusions[name] += 1
    elif "custom-call(" in line and "cublas" in line and '"beta":1' in line:
        gemms[name] += 1
print(files[0].split("/")[-1])
print("loop fusions writing bf16[..., d_model], by op:", dict(fusions))
print("GEMMs writing bf16[..., d_model] with beta = 1, by op:", dict(gemms))
