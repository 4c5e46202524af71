"""Measures the foundation issue's acceptance points on this machine's CPU.

    python bench/foundation_acceptance.py --out=/tmp/foundation.json

1. The README's tiny training command: wall time, loss at step 0 vs the last step.
2. 40 steps straight vs 20 steps then a rerun to 40 (same workdir): steps 20-39 identical?
3. The same after `kill -9` mid-run: resume from the last complete checkpoint.
Prints a table last; writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "olmo2_jax.main", "--config=configs/tiny.py"]
# A fixed schedule horizon, so stopping at 20 and rerunning to 40 keeps the same LRs.
RESUME = ["--config.optim.decay_steps=40", "--config.checkpoint.every_steps=5",
          "--config.checkpoint.keep=20", "--config.train.log_every=1"]


def run(args, **kw):
    return subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, **kw)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip_tiny", action="store_true", help="skip the full default tiny run")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="olmo2_acceptance_")
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {os.cpu_count()} cores {platform.processor()}"}
    if not args.skip_tiny:
        t0 = time.time()
        run(TRAIN + [f"--workdir={tmp}/tiny"])
        ls = losses(f"{tmp}/tiny")
        res["tiny"] = {"wall_s": round(time.time() - t0, 1), "loss_step0": ls[0],
                       "loss_last": ls[max(ls)], "last_step": max(ls),
                       "ratio": ls[max(ls)] / ls[0]}

    run(TRAIN + RESUME + ["--config.train.steps=40", f"--workdir={tmp}/straight"])
    run(TRAIN + RESUME + ["--config.train.steps=20", f"--workdir={tmp}/resumed"])
    run(TRAIN + RESUME + ["--config.train.steps=40", f"--workdir={tmp}/resumed"])
    a, b = losses(f"{tmp}/straight"), losses(f"{tmp}/resumed")
    res["resume"] = {"steps_compared": "20-39",
                     "bit_identical": all(a[s] == b[s] for s in range(20, 40))}

    killed = f"{tmp}/killed"
    proc = subprocess.Popen(TRAIN + RESUME + ["--config.train.steps=40", f"--workdir={killed}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = os.path.join(killed, "checkpoints")
    while proc.poll() is None:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if any(int(d) >= 15 for d in done):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    partial = sorted(d for d in os.listdir(ckpts) if not d.isdigit())
    run(TRAIN + RESUME + ["--config.train.steps=40", f"--workdir={killed}"])
    c = losses(killed)
    start = complete[-1]
    res["kill9"] = {"killed_after_checkpoints": complete, "partial_dirs_left": partial,
                    "resumed_from": start, "steps_compared": f"{start}-39",
                    "bit_identical": all(a[s] == c[s] for s in range(start, 40))}
    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
