"""Creates a TPU VM pod slice, installs this checkout on every worker, trains, tears down.

    python launch/tpu.py all --name=olmo2 --zone=us-central2-b --accelerator=v4-32 \\
        --config=configs/1b.py --workdir=/tmp/olmo2 \\
        --overrides="--config.checkpoint.directory=gs://BUCKET/olmo2_1b/checkpoints"

Steps: create, copy (git archive of HEAD -> every worker), install, train, delete; `all` runs
them in order. Every worker runs the same `python -m olmo2_jax.main`; main.py calls
jax.distributed.initialize() when TPU_WORKER_HOSTNAMES lists several hosts. A preempted
(spot) VM gets SIGTERM: the loop saves, commits and exits 0, and rerunning `train` resumes.
--dry_run prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

STEPS = ("create", "copy", "install", "train", "delete")
ARCHIVE = "/tmp/olmo2_jax.tar.gz"


def commands(args) -> list[tuple[str, list[str]]]:
    """(step, argv) for the steps asked for, in order."""
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    ssh = tpu + ["ssh", args.name, *where, "--worker=all", "--command"]
    train = shlex.join(["python", "-m", "olmo2_jax.main", f"--config={args.config}",
                        f"--workdir={args.workdir}", *shlex.split(args.overrides)])
    out = {
        "create": [tpu + ["create", args.name, *where, f"--accelerator-type={args.accelerator}",
                          f"--version={args.version}"] + (["--spot"] if args.spot else [])],
        "copy": [["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
                 tpu + ["scp", ARCHIVE, f"{args.name}:~/olmo2_jax.tar.gz", *where,
                        "--worker=all"]],
        "install": [ssh + ["mkdir -p ~/olmo2_jax && tar xzf ~/olmo2_jax.tar.gz -C ~/olmo2_jax "
                           "&& cd ~/olmo2_jax && pip install -U 'jax[tpu]' "
                           "&& pip install -e '.[gcs]'"]],
        "train": [ssh + [f"cd ~/olmo2_jax && {train}"]],
        "delete": [tpu + ["delete", args.name, *where, "--quiet"]],
    }
    chosen = STEPS if args.step == "all" else (args.step,)
    return [(s, argv) for s in chosen for argv in out[s]]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=STEPS + ("all",))
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--project", default="", help="GCP project; default: gcloud's")
    p.add_argument("--accelerator", default="v4-8", help="accelerator type, e.g. v5p-64")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime image")
    p.add_argument("--spot", action="store_true", help="preemptible (spot) capacity")
    p.add_argument("--config", default="configs/1b.py")
    p.add_argument("--workdir", default="/tmp/olmo2", help="local on each worker (metrics)")
    p.add_argument("--overrides", default="", help='e.g. "--config.train.steps=100"')
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    for step, cmd in commands(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"launch/tpu.py: step {step!r} failed with exit code {rc}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
