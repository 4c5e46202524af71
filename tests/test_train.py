"""The training loop end to end: loss falls, metrics are written, resume is exact."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from olmo2_jax import config as config_lib
from olmo2_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_file(path, n=40_000, vocab=256, seed=0):
    """A learnable stream: a noisy repeating pattern, so the loss visibly falls."""
    rng = np.random.default_rng(seed)
    base = np.tile(rng.integers(0, vocab, 97), n // 97 + 1)[:n]
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(0, vocab, noise.sum())
    base.astype("<u4").tofile(path)
    return str(path)


def small_config(data_path, **train_kw):
    c = runpy.run_path(os.path.join(REPO, "configs/tiny.py"))["get_config"]()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64,
                   vocab_size=256, padded_vocab_size=256, max_seq_len=32)
    c.data.update(paths=data_path, seq_len=32)
    c.train.update(dict(steps=12, global_batch_size=8, log_every=1), **train_kw)
    c.optim.update(warmup_steps=2, lr=1e-2, decay_steps=12)  # horizon fixed across reruns
    c.checkpoint.update(every_steps=4, async_save=True, keep=5)
    c.mesh.update(data=2, fsdp=-1, tensor=2)  # the 8 fake devices: 2 x 2 x 2
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}, rows


def test_train_writes_metrics_and_learns(tmp_path):
    c = small_config(token_file(tmp_path / "tokens.npy"))
    last = train.train(c, str(tmp_path / "run"))
    by_step, rows = losses(tmp_path / "run")
    assert sorted(by_step) == list(range(12))
    for key in ("step", "loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert key in rows[0]
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(1e-2)
    assert by_step[11] < 0.9 * by_step[0]
    assert last["step"] == 11
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["12", "4", "8"]
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "run" / "tensorboard"))


def test_resume_is_bit_identical(tmp_path):
    data = token_file(tmp_path / "tokens.npy")
    train.train(small_config(data), str(tmp_path / "straight"))
    # Interrupted at 8 (last checkpoint at 8), then rerun to 12 with the same workdir.
    train.train(small_config(data, steps=8), str(tmp_path / "resumed"))
    train.train(small_config(data), str(tmp_path / "resumed"))
    a, _ = losses(tmp_path / "straight")
    b, rows = losses(tmp_path / "resumed")
    assert [r["step"] for r in rows] == list(range(12))  # one line per step, none repeated
    assert all(a[s] == b[s] for s in range(12)), {s: (a[s], b[s]) for s in range(12)}


def test_bad_data_path_is_a_clear_error(tmp_path):
    c = small_config(str(tmp_path / "missing*.npy"))
    with pytest.raises(FileNotFoundError, match="missing"):
        train.train(c, str(tmp_path / "run"))
    bad = tmp_path / "odd.npy"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(config_lib.ConfigError, match="odd.npy"):
        train.train(small_config(str(bad)), str(tmp_path / "run"))


def _cli(workdir, data, steps, *extra):
    return [sys.executable, "-m", "olmo2_jax.main", "--config=configs/tiny.py",
            f"--workdir={workdir}", f"--config.data.paths={data}",
            "--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
            "--config.model.n_kv_heads=2", "--config.model.mlp_hidden=64",
            "--config.model.vocab_size=256", "--config.model.padded_vocab_size=256",
            "--config.model.max_seq_len=32", "--config.data.seq_len=32",
            "--config.train.global_batch_size=8", f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.checkpoint.every_steps=2",
            "--config.optim.decay_steps=400",
            "--config.checkpoint.keep=20", *extra]


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    """A run killed with SIGKILL resumes from its last complete checkpoint, exactly."""
    data = token_file(tmp_path / "tokens.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO)
    steps = 400  # long enough that the kill lands mid-run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, data, steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpts = killed / "checkpoints"
    while time.time() < deadline:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert kept and kept[-1] < steps, kept
    rerun_matches_straight(killed, tmp_path / "straight", data, kept[-1] + 6, env)


def rerun_matches_straight(workdir, straight, data, stop, env, extra=()):
    """Reruns the interrupted `workdir` to `stop` and an uninterrupted run in `straight`:
    one metrics line per step, and bit-identical losses."""
    for run in (workdir, straight):
        subprocess.run(_cli(run, data, stop, *extra), cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, _ = losses(straight)
    b, rows = losses(workdir)
    assert [r["step"] for r in rows] == list(range(stop))
    assert all(a[s] == b[s] for s in range(stop)), {s: (a[s], b[s]) for s in range(stop)}
