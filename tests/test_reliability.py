"""Preemption, crash safety, bad checkpoints and the step guard (NaN skip, spike rule, rollback)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo2_jax import checkpoint, guard, train
from olmo2_jax import config as config_lib
from test_train import REPO, _cli, losses, rerun_matches_straight, small_config, token_file


def rows_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps_saved(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_saves_commits_exits_0_and_resumes_exactly(tmp_path):
    data = token_file(tmp_path / "tokens.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
    run = tmp_path / "preempted"
    # No step-based save before the signal: the only checkpoint is the SIGTERM one.
    cmd = _cli(run, data, 400) + ["--config.checkpoint.every_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    saved = steps_saved(run)
    assert len(saved) == 1 and 3 <= saved[0] < 400, saved
    assert not [d for d in os.listdir(run / "checkpoints") if "tmp" in d]  # committed
    assert [r["step"] for r in rows_of(run)] == list(range(saved[0]))
    rerun_matches_straight(run, tmp_path / "straight", data, saved[0] + 4, env)


def test_save_interrupted_mid_write_is_never_used(tmp_path, capsys):
    """A step directory left half-written (orbax's `<step>.orbax-checkpoint-tmp-*`, renamed
    only on commit) is ignored and cleaned up; the resume continues from the last complete
    step and matches the uninterrupted run."""
    data = token_file(tmp_path / "tokens.npy")
    run = tmp_path / "run"
    train.train(small_config(data, steps=4), str(run))
    ckpts = run / "checkpoints"
    partial = ckpts / "8.orbax-checkpoint-tmp-1764400000"
    shutil.copytree(ckpts / "4", partial)
    shutil.rmtree(partial / "state")  # the kill landed while the arrays were being written
    capsys.readouterr()
    train.train(small_config(data), str(run))
    assert "resuming from step 4" in capsys.readouterr().out
    straight = tmp_path / "straight"
    train.train(small_config(data), str(straight))
    a, _ = losses(straight)
    b, rows = losses(run)
    assert [r["step"] for r in rows] == list(range(12))
    assert all(a[s] == b[s] for s in range(12))
    assert not partial.exists()


def test_time_based_saves(tmp_path):
    c = small_config(token_file(tmp_path / "tokens.npy"), steps=6)
    c.checkpoint.update(every_steps=1000, every_seconds=1e-6, keep=10)
    train.train(c, str(tmp_path / "run"))
    assert steps_saved(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_mismatched_or_corrupted_checkpoint_is_a_clear_error(tmp_path):
    data = token_file(tmp_path / "tokens.npy")
    run = tmp_path / "run"
    train.train(small_config(data, steps=4), str(run))
    wider = small_config(data, steps=8)
    wider.model.update(d_model=48, n_heads=4)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"config\.model\.d_model: checkpoint 32, now 48.*"
                             r"Tensors: params\..*saved shape"):
        train.train(wider, str(run))
    guarded = small_config(data, steps=8, skip_sigma=6.0)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"config\.train\.skip_sigma.*missing tensor guard\.count"):
        train.train(guarded, str(run))
    # Array data gone (disk trouble, a partial copy): named, with the fix.
    state_dir = run / "checkpoints" / "4" / "state"
    shutil.copytree(state_dir, tmp_path / "state_copy")
    for name in ("d", "ocdbt.process_0"):
        shutil.rmtree(state_dir / name)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4.*delete that step"):
        train.train(small_config(data, steps=8), str(run))
    shutil.rmtree(state_dir)
    shutil.copytree(tmp_path / "state_copy", state_dir)
    shutil.rmtree(state_dir / "array_metadatas")
    (state_dir / "_METADATA").write_text("{truncated")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4.*delete that step"):
        train.train(small_config(data, steps=8), str(run))


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints.*not usable"):
        train.train(small_config(token_file(tmp_path / "tokens.npy")), str(run))
    with pytest.raises(checkpoint.CheckpointError, match="s3://b/x.*gs://"):
        checkpoint.make_manager("s3://b/x", keep=1, async_save=False)


def test_spike_rule_skips_outliers_and_nonfinite():
    g = guard.init(8)
    rng = np.random.default_rng(0)
    for v in 3.0 + 0.01 * rng.standard_normal(8):
        ok, g = guard.check(g, jnp.float32(v), jnp.float32(1.0 + v / 100), 6.0)
        assert bool(ok)
    assert int(g["count"]) == 8
    for loss, gnorm in ((3.5, 1.03), (3.0, 5.0), (np.nan, 1.0), (3.0, np.inf)):
        ok, g2 = guard.check(g, jnp.float32(loss), jnp.float32(gnorm), 6.0)
        assert not bool(ok), (loss, gnorm)
        assert int(g2["count"]) == 8 and np.array_equal(g2["history"], g["history"])
    ok, _ = guard.check(g, jnp.float32(3.01), jnp.float32(1.03), 6.0)
    assert bool(ok)
    ok, none = guard.check(None, jnp.float32(np.nan), jnp.float32(1.0), 0.0)
    assert not bool(ok) and none is None


def _poison(monkeypatch, calls):
    """Makes the batches of the given _to_global calls produce a NaN loss; records inputs."""
    seen = []
    real = train._to_global

    def poisoned(local, sharding):
        local = dict(local)
        seen.append(np.array(local["inputs"], copy=True))
        if len(seen) - 1 in calls:
            local["loss_mask"] = np.full_like(local["loss_mask"], np.nan)
        return real(local, sharding)

    monkeypatch.setattr(train, "_to_global", poisoned)
    return seen


def test_nan_step_is_skipped_and_never_saved(tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    c = small_config(token_file(tmp_path / "tokens.npy"), steps=8)
    c.checkpoint.update(every_steps=4)  # the save at 4 comes right after the poisoned step 3
    train.train(c, str(tmp_path / "run"))
    rows = rows_of(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert np.isnan(rows[3]["loss"]) and np.isfinite(rows[7]["loss"])
    model = train.Transformer(train.ModelConfig.from_config(c.model))
    tx, _ = train.optim.make_optimizer(c.optim, c.train.steps)
    mesh = train.sharding.make_mesh(c)
    with jax.set_mesh(mesh), train.nn.logical_axis_rules(train.sharding.RULES):
        abstract, _ = train.state_shardings(model, tx, mesh, jax.random.PRNGKey(0))
        manager = checkpoint.make_manager(str(tmp_path / "run" / "checkpoints"), keep=5,
                                          async_save=False)
        for step in (4, 8):
            state, _ = checkpoint.restore(manager, step, abstract, None)
            assert bool(guard.all_finite(state.params)) and bool(guard.all_finite(state.opt_state))
            assert int(state.step) == step
        manager.close()


def test_skipped_step_leaves_params_and_optimizer_untouched(tmp_path):
    c = small_config(token_file(tmp_path / "tokens.npy"))
    model = train.Transformer(train.ModelConfig.from_config(c.model))
    tx, schedule = train.optim.make_optimizer(c.optim, c.train.steps)
    mesh = train.sharding.make_mesh(c)
    step_fn = jax.jit(train.make_train_step(model, tx, schedule,
                                            train.LossConfig(z_loss_weight=1e-4, chunks=0),
                                            accum_steps=1))
    batch = {"inputs": jnp.ones((8, 32), jnp.int32), "targets": jnp.ones((8, 32), jnp.int32),
             "loss_mask": jnp.ones((8, 32), jnp.float32)}
    with jax.set_mesh(mesh), train.nn.logical_axis_rules(train.sharding.RULES):
        state, _ = train.create_state(model, tx, mesh, jax.random.PRNGKey(0))
        before = jax.device_get(state)
        bad = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.inf))
        after_dev, m = step_fn(state, bad)
        after = jax.device_get(after_dev)
        assert float(m["skipped"]) == 1.0 and int(after.step) == 1
        for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                        jax.tree.leaves((after.params, after.opt_state))):
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_array_equal(a, b)  # params and moments untouched
            else:
                assert b == a + 1  # optax counts move on with the schedule
        good, m = step_fn(after_dev, batch)  # step 1: lr > 0 after warmup's first step
        assert float(m["skipped"]) == 0.0
        good = jax.device_get(good.params)
        assert any(not np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(good)))


def test_persistent_nan_rolls_back_and_skips_batches(tmp_path, monkeypatch, caplog):
    seen = _poison(monkeypatch, {5, 6})
    c = small_config(token_file(tmp_path / "tokens.npy"), steps=12, rollback_after=2,
                     rollback_skip_batches=3)
    c.checkpoint.update(every_steps=4)
    with caplog.at_level(logging.WARNING):
        train.train(c, str(tmp_path / "run"))
    assert "rollback at step 8: reloaded step 4 and skipped 3 batches" in caplog.text
    rows = rows_of(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(12))  # the rolled-back steps were dropped
    assert all(r["skipped"] == 0 for r in rows) and all(np.isfinite(r["loss"]) for r in rows)
    assert steps_saved(tmp_path / "run") == [4, 8, 12]
    # Calls 0..7 read batches 0..7; after the rollback to 4 the stream skips 3: batch 7 again.
    np.testing.assert_array_equal(seen[8], seen[7])
    assert len(seen) == 8 + 8


def test_rollback_without_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    _poison(monkeypatch, {0, 1, 2})
    c = small_config(token_file(tmp_path / "tokens.npy"), steps=8, rollback_after=2)
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to"):
        train.train(c, str(tmp_path / "run"))


def test_guard_config_is_validated():
    c = config_lib.base_config()
    c.train.steps = 5000
    c.train.skip_sigma = -1.0
    with pytest.raises(config_lib.ConfigError, match="skip_sigma"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.train.steps = 5000
    c.checkpoint.every_seconds = -5.0
    with pytest.raises(config_lib.ConfigError, match="every_seconds"):
        config_lib.validate(c)


def test_kill_9_during_async_save_resumes_from_previous_checkpoint(tmp_path):
    """SIGKILL while an async save is being written (its tmp directory exists): the resume
    starts from the last committed step and continues exactly like an uninterrupted run.
    The model has a large embedding so each save takes long enough to be caught."""
    data = token_file(tmp_path / "tokens.npy", vocab=256)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
    big = ["--config.model.vocab_size=256", "--config.model.padded_vocab_size=65536",
           "--config.model.d_model=128", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
           "--config.model.mlp_hidden=128", "--config.train.loss_chunks=4",
           "--config.checkpoint.every_steps=3"]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, data, 400) + big, cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline, caught = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpts) if ckpts.exists() else []
        tmp = [n for n in names if "orbax-checkpoint-tmp" in n]
        if tmp and any(n.isdigit() for n in names):
            caught = tmp[0]
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught, "no save was in flight to interrupt"
    interrupted = int(caught.split(".")[0])
    committed = steps_saved(run)
    assert committed and committed[-1] < interrupted <= 400, (committed, caught)
    rerun_matches_straight(run, tmp_path / "straight", data, committed[-1] + 3, env, big)
    assert not [n for n in os.listdir(ckpts) if "tmp" in n]
