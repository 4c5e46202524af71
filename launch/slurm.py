"""Multi-node GPU training under SLURM: writes an sbatch script and submits it.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --config=configs/7b.py \\
        --workdir=/shared/olmo2_7b --partition=gpu

One task per node; each runs `python -m olmo2_jax.main`, and main.py calls
jax.distributed.initialize(), which reads the coordinator and ranks from SLURM's variables.
SLURM sends SIGTERM `--signal_seconds` before the time limit (and on preemption): the loop
saves, commits and exits 0, and `--requeue` restarts the job, which resumes exactly.
--dry_run prints the script and the sbatch command instead of submitting.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

# What may go into the #SBATCH lines: sbatch reads them, not a shell, but a newline (or a
# stray character) would end the directive and start a shell line. Each flag has its set.
SAFE = {
    "name": (r"[A-Za-z0-9._-]+", "letters, digits, '.', '_' and '-' (it also names the "
             ".sbatch file)"),
    "partition": (r"[A-Za-z0-9._,-]+", "letters, digits, '.', '_', '-' and ',' between "
                  "partitions"),
    "time": (r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|unlimited|INFINITE|infinite",
             "a SLURM time: minutes, [hours:]minutes:seconds, days-hours[:minutes[:seconds]] "
             "or UNLIMITED"),
    "workdir": (r"[A-Za-z0-9._/+@=,:-]+", "a path of letters, digits and ._/+@=,:- (no "
                "spaces, quotes, '~', '$' or '%': SLURM expands % in --output)"),
}


def check(args) -> str | None:
    """The first flag whose value may not go into an #SBATCH line, with the allowed set."""
    for flag, (pattern, allowed) in SAFE.items():
        value = getattr(args, flag)
        if (value or flag != "partition") and not re.fullmatch(pattern, value):
            return f"--{flag}={value!r}: use {allowed}"
    return None


def script(args) -> str:
    """The sbatch script; `args` passed `check` (the #SBATCH values), and whatever goes into
    a shell line is quoted."""
    train = shlex.join([args.python, "-m", "olmo2_jax.main", f"--config={args.config}",
                        f"--workdir={args.workdir}", *shlex.split(args.overrides)])
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={args.name}",
             f"#SBATCH --nodes={args.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}",
             f"#SBATCH --time={args.time}",
             f"#SBATCH --signal=B:TERM@{args.signal_seconds}",
             "#SBATCH --requeue",
             f"#SBATCH --output={args.workdir}/slurm-%j.out"]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    lines += ["set -uo pipefail",
              f"cd {shlex.quote(args.repo)}",
              f"srun --kill-on-bad-exit=1 {train} &",
              "pid=$!",
              # the batch shell gets SIGTERM; srun forwards it to every task, then we wait
              # for the save to commit (the first wait returns early on the signal)
              'trap \'kill -TERM "$pid" 2>/dev/null\' TERM',
              'wait "$pid"; wait "$pid"']
    return "\n".join(lines) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--cpus_per_task", type=int, default=16)
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--signal_seconds", type=int, default=300,
                   help="SIGTERM this long before the time limit (time to save)")
    p.add_argument("--name", default="olmo2")
    p.add_argument("--config", default="configs/1b.py")
    p.add_argument("--workdir", required=True, help="shared by all nodes")
    p.add_argument("--overrides", default="", help='e.g. "--config.train.steps=100"')
    p.add_argument("--python", default="python")
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--dry_run", action="store_true", help="print, submit nothing")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus_per_node must be >= 1")
    if args.cpus_per_task < 1 or args.signal_seconds < 0:
        p.error("--cpus_per_task must be >= 1 and --signal_seconds >= 0")
    problem = check(args)
    if problem:
        p.error(problem)
    try:
        shlex.split(args.overrides)
    except ValueError as e:
        p.error(f"--overrides={args.overrides!r}: {e} (quote it as one shell word)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    text = script(args)
    path = os.path.join(args.workdir, f"{args.name}.sbatch")
    cmd = ["sbatch", path]
    if args.dry_run:
        print(text + "# " + shlex.join(cmd))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(shlex.join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
