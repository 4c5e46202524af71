"""The launchers' command lines, through their --dry_run mode (nothing is created)."""

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry(script, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args,
                          "--dry_run"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_tpu_all_steps_in_order():
    lines = dry("tpu.py", "all", "--name=pod", "--zone=us-central2-b", "--project=p",
                "--accelerator=v5p-64", "--spot", "--config=configs/7b.py",
                "--overrides=--config.checkpoint.directory=gs://b/ck --config.train.steps=5")
    argv = [shlex.split(line) for line in lines]
    assert argv[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                       "--zone=us-central2-b", "--project=p", "--accelerator-type=v5p-64",
                       "--version=tpu-ubuntu2204-base", "--spot"]
    assert argv[1][:2] == ["git", "archive"] and argv[2][4] == "scp"
    assert "--worker=all" in argv[2] and "--worker=all" in argv[3] and "--worker=all" in argv[4]
    assert "pip install -e '.[gcs]'" in argv[3][-1]
    train = shlex.split(argv[4][-1].split("&&")[1])
    assert train == ["python", "-m", "olmo2_jax.main", "--config=configs/7b.py",
                     "--workdir=/tmp/olmo2", "--config.checkpoint.directory=gs://b/ck",
                     "--config.train.steps=5"]
    assert argv[5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                       "--zone=us-central2-b", "--project=p", "--quiet"]


def test_tpu_single_step():
    assert dry("tpu.py", "delete", "--name=pod", "--zone=z") == [
        "gcloud compute tpus tpu-vm delete pod --zone=z --quiet"]


def test_slurm_script():
    lines = dry("slurm.py", "--nodes=4", "--gpus_per_node=8", "--workdir=/shared/run",
                "--config=configs/1b.py", "--partition=h200", "--overrides=--config.train.steps=9")
    text = "\n".join(lines)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=B:TERM@300", "#SBATCH --requeue", "#SBATCH --partition=h200"):
        assert line in lines, line
    assert ("srun --kill-on-bad-exit=1 python -m olmo2_jax.main --config=configs/1b.py "
            "--workdir=/shared/run --config.train.steps=9 &") in text
    assert lines[-1] == "# sbatch /shared/run/olmo2.sbatch"
    # the script is valid bash
    subprocess.run(["bash", "-n"], input="\n".join(lines[:-1]), text=True, check=True)


def test_slurm_bad_nodes_is_a_clear_error():
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), "--nodes=0",
                          "--workdir=/x", "--dry_run"], capture_output=True, text=True)
    assert out.returncode == 2 and "--nodes" in out.stderr


def slurm(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), "--nodes=1",
                           *args, "--dry_run"], cwd=REPO, capture_output=True, text=True)


def test_slurm_refuses_what_could_break_out_of_an_sbatch_line():
    """--name/--partition/--time/--workdir go into #SBATCH lines: a newline (which would
    start a shell line) or a character outside each flag's set is refused, naming the flag."""
    for flag, value in (("name", "run\nrm -rf ~"), ("name", "a/b"), ("partition", "gpu\nid"),
                        ("partition", "a b"), ("time", "1:00:00\nid"), ("time", "1;id"),
                        ("workdir", "/x\n#SBATCH --uid=0"), ("workdir", "/x/$(id)"),
                        ("workdir", "/runs/%j"), ("workdir", "/a b")):
        args = [f"--{flag}={value}"] + ([] if flag == "workdir" else ["--workdir=/scratch/run"])
        out = slurm(*args)
        assert out.returncode == 2 and not out.stdout, (flag, value, out.stdout)
        assert f"error: --{flag}={value!r}: use " in out.stderr, out.stderr
    for time_limit in ("30", "4:00:00", "2-00", "2-12:30:00", "UNLIMITED"):
        assert slurm(f"--time={time_limit}", "--workdir=/scratch/run").returncode == 0


def test_slurm_quotes_what_goes_into_shell_lines():
    out = slurm("--workdir=/scratch/run", "--repo=/src/my repo; id", "--python=/opt/py env/python",
                "--config=configs/1b.py", "--overrides=--config.data.paths='/d/a b.npy'")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "cd '/src/my repo; id'" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert shlex.split(srun)[2:] == ["/opt/py env/python", "-m", "olmo2_jax.main",
                                     "--config=configs/1b.py", "--workdir=/scratch/run",
                                     "--config.data.paths=/d/a b.npy", "&"]
    subprocess.run(["bash", "-n"], input="\n".join(lines[:-1]), text=True, check=True)
