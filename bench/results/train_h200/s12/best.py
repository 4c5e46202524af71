"""Prints the fastest tile settings of a kernel bench's --sweep JSON (bench/swiglu.py, bench/rmsnorm.py)."""
import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
groups = {}
for r in rows:
    if "tuning" in r and r.get("what", "bwd") == "bwd" and r.get("impl") == "ours":
        groups.setdefault(r.get("shape", "swiglu"), []).append(r)
for name, rs in groups.items():
    for r in sorted(rs, key=lambda r: r["ms"])[:3]:
        print(name, r["ms"], r.get("GB/s", ""), r["tuning"])
