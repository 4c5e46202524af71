"""TrainState, the pure `train_step(state, batch) -> (state, metrics)`, and the host loop."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from olmo2_jax import checkpoint
from olmo2_jax import config as config_lib
from olmo2_jax import guard as guard_lib
from olmo2_jax import metrics as metrics_lib
from olmo2_jax import optim, sharding
from olmo2_jax.data import loader as data_loader
from olmo2_jax.loss import LossConfig, fused_lm_head_loss, loss_sums
from olmo2_jax.model import ModelConfig, Transformer


@struct.dataclass
class TrainState:
    step: jax.Array  # train steps run so far (skipped ones included): drives the schedule
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, for stages that sample (kept so resumes are exact)
    guard: Any = None  # skip-step window (guard.py), None when the rule is off


def init_state(model: Transformer, tx: optax.GradientTransformation, rng: jax.Array,
               skip_window: int = 0) -> TrainState:
    """A fresh state with boxed (logically annotated) leaves; unbox after sharding."""
    params_rng, state_rng = jax.random.split(rng)
    # Attention has no parameters: initialise through XLA attention so a kernel's shape
    # constraints (e.g. Pallas under shard_map) never meet the 1x1 init batch.
    init_model = model.clone(cfg=dataclasses.replace(model.cfg, attention="xla"))
    params = init_model.init(params_rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng, guard=guard_lib.init(skip_window))


def state_shardings(model, tx, mesh, rng, skip_window: int = 0):
    """(abstract unboxed state with shardings, shardings), without allocating anything."""
    abstract = jax.eval_shape(functools.partial(init_state, model, tx, skip_window=skip_window),
                              rng)
    shardings = sharding.logical_shardings(mesh, abstract)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    plain = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract, is_leaf=is_box)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            plain, shardings)
    return abstract, shardings


def create_state(model, tx, mesh, rng, skip_window: int = 0):
    """Initialises the state directly sharded: no device ever holds the whole of it."""
    _, shardings = state_shardings(model, tx, mesh, rng, skip_window)
    init = jax.jit(lambda r: nn.unbox(init_state(model, tx, r, skip_window)),
                   out_shardings=shardings)
    return init(rng), shardings


def jit_train_step(model: Transformer, tx, schedule, loss: LossConfig, *, accum_steps: int,
                   mesh, shardings, batch_sharding, skip_sigma: float = 0.0):
    """The train step jitted as every caller runs it (training, benches, AOT compile): state
    sharded in and out and donated."""
    return jax.jit(
        make_train_step(model, tx, schedule, loss, accum_steps=accum_steps, mesh=mesh,
                        skip_sigma=skip_sigma),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
        donate_argnums=(0,))


def make_train_step(model: Transformer, tx, schedule, loss: LossConfig, *, accum_steps: int,
                    mesh=None, skip_sigma: float = 0.0):
    """Returns the pure train_step. With accum_steps > 1 the batch is split into that many
    micro-batches, scanned with summed gradients, and normalised by the total count of
    loss tokens, so the update equals that of the whole batch at once. loss.chunks > 0
    uses the fused LM-head loss (no [B, T, V] logits); 0 materialises the logits.
    A non-finite (or, with skip_sigma > 0, spiking) step is skipped: see guard.py."""
    z_loss_weight = loss.z_loss_weight

    def loss_fn(params, batch):
        args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        if loss.chunks:
            hidden = model.apply({"params": params}, *args, method=Transformer.hidden)
            total, ce, z, n = fused_lm_head_loss(hidden, params["lm_head"], batch["targets"],
                                                 batch["loss_mask"], loss)
            return total, (ce, z, n)
        ce, z, n = loss_sums(model.apply({"params": params}, *args), batch["targets"],
                             batch["loss_mask"])
        return ce + z_loss_weight * z, (ce, z, n)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def split(x):
        # [G, ...] -> [A, G/A, ...] taking rows A apart, so each device keeps its own rows.
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)
            x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
        return x

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, batch)
        else:
            def body(carry, micro):
                acc_grads, acc_sums = carry
                (_, sums), grads = grad_fn(state.params, micro)
                return (jax.tree.map(jnp.add, acc_grads, grads),
                        jax.tree.map(jnp.add, acc_sums, sums)), None

            zero = (jax.tree.map(jnp.zeros_like, state.params), (jnp.zeros(()),) * 3)
            (grads, sums), _ = jax.lax.scan(body, zero, jax.tree.map(split, batch))
        ce, z, n = sums
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": ce / denom, "z_loss": z_loss_weight * z / denom,
                   "grad_norm": optim.global_norm(grads), "lr": schedule(state.step),
                   "loss_tokens": n}
        metrics["total_loss"] = metrics["loss"] + metrics["z_loss"]
        ok, guard = guard_lib.check(state.guard, metrics["total_loss"], metrics["grad_norm"],
                                    skip_sigma)
        metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1, guard=guard,
            opt_state=guard_lib.select(ok, opt_state, state.opt_state),
            params=guard_lib.select(ok, optax.apply_updates(state.params, updates), state.params))
        return new_state, metrics

    return train_step


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training to config.train.steps; returns the last logged metrics
    (with "preempted": True when a SIGTERM stopped it early, after a committed save)."""
    config_lib.validate(config, jax.device_count())
    data = data_loader.from_config(config)
    mesh = sharding.make_mesh(config)
    model = Transformer(ModelConfig.from_config(config.model))
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    t = config.train
    skip_window = t.skip_window if t.skip_sigma > 0 else 0
    accum = t.global_batch_size // config_lib.micro_batch_size(config)
    flops_per_token = config_lib.flops_per_token(config.model, config.data.seq_len)
    peak = t.peak_flops_per_device or metrics_lib.peak_flops_per_device()
    tokens_per_step = t.global_batch_size * config.data.seq_len

    if "://" in workdir:
        raise config_lib.ConfigError(
            f"--workdir={workdir}: metrics and TensorBoard need a local workdir; put the "
            "checkpoints on GCS with "
            f"--config.checkpoint.directory={workdir.rstrip('/')}/checkpoints")
    init_from = _check_init_from(config) if t.init_from else None
    data_iter = data.iterator(jax.process_index(), jax.process_count())
    manager = checkpoint.make_manager(config.checkpoint.directory
                                      or os.path.join(workdir, "checkpoints"),
                                      keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    try:
        tokenizer = _record_tokenizer(config, data.tokenizer_spec, str(manager.directory))
    except config_lib.ConfigError:
        manager.close()
        raise
    rng = jax.random.PRNGKey(t.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES), _Preemption() as preempt:
        abstract, shardings = state_shardings(model, tx, mesh, rng, skip_window)
        start = manager.latest_step()
        if start is None:
            state, _ = create_state(model, tx, mesh, rng, skip_window)
            if init_from:
                state = state.replace(params=checkpoint.load_params(
                    init_from, model.cfg, mesh, step_flag=None))
            start = 0
        else:
            try:
                state, meta = checkpoint.restore(manager, start, abstract, data_iter,
                                                 config=config.to_dict())
            except checkpoint.CheckpointError:
                manager.close()  # no orbax threads left behind
                raise
            _warn_config_changes(meta.get("config", {}), config.to_dict())
        batch_sharding = sharding.batch_sharding(mesh)
        if jax.process_index() == 0:
            n_params = config_lib.count_params(config.model)["total"]
            print(f"olmo2_jax: {n_params:,} params | mesh {dict(mesh.shape)} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} devices | "
                  f"{tokens_per_step:,} tokens/step, {accum} micro-batch(es) | "
                  f"{'resuming from step ' + str(start) if start else 'fresh start'} | "
                  f"workdir {workdir}", flush=True)
        step_fn = jit_train_step(model, tx, schedule, LossConfig.from_config(config),
                                 accum_steps=accum, mesh=mesh,
                                 shardings=shardings, batch_sharding=batch_sharding,
                                 skip_sigma=t.skip_sigma)
        writer = metrics_lib.MetricsWriter(workdir, total_steps=t.steps, start_step=start,
                                           enabled=jax.process_index() == 0)
        saver = _Saver(manager, data_iter, {"config": config.to_dict(), "tokenizer": tokenizer},
                       config.checkpoint)
        last, pending, prev_skip, bad_run = {}, None, None, 0
        mark = (start - 1, time.perf_counter())  # (step, time) of the last emitted metrics
        step = start
        try:
            while step < t.steps:
                batch = _to_global(next(data_iter), batch_sharding)
                state, step_metrics = step_fn(state, batch)
                # Metrics are read one step late, so the host never waits on the device.
                if pending is not None:
                    last, mark = _emit(writer, *pending, mark, tokens_per_step, flops_per_token,
                                       peak, mesh.size)
                    pending = None
                if prev_skip is not None:
                    bad_run = _note_skip(*prev_skip, bad_run)
                prev_skip = (step, step_metrics["skipped"])
                if step % t.log_every == 0 or step == t.steps - 1 or step == start:
                    pending = (step, step_metrics)
                writer.advance()
                step += 1
                saver.check(step, t.log_every)  # a failed async save stops the run here
                roll_back = bool(t.rollback_after) and bad_run >= t.rollback_after
                if not roll_back:
                    stop = preempt.requested(step, t.log_every)
                    if ((stop or saver.due(step, t.steps, t.log_every))
                            and not saver.save(step, state)):  # poisoned state: not saved
                        if not t.rollback_after:
                            raise FloatingPointError(
                                f"step {step}: non-finite parameters; nothing was saved. Set "
                                "config.train.rollback_after to reload the last checkpoint")
                        roll_back = True
                if roll_back:
                    saver.settle()
                    state, step = _rollback(manager, abstract, data_iter, config, writer, step)
                    last, pending, prev_skip, bad_run = {}, None, None, 0
                    mark = (step - 1, time.perf_counter())
                    continue
                if stop:
                    logging.warning("SIGTERM: saved step %d; waiting for the commit", step)
                    break
            if pending is not None:
                last, mark = _emit(writer, *pending, mark, tokens_per_step, flops_per_token, peak,
                                   mesh.size)
            if prev_skip is not None:
                _note_skip(*prev_skip, bad_run)
            saver.settle()
            if step < t.steps:
                last = dict(last, preempted=True)
        finally:
            writer.close()
            manager.close()
            if hasattr(data_iter, "close"):
                data_iter.close()
    return last


def _record_tokenizer(config, spec: str, directory: str) -> dict | None:
    """Keeps the run's tokenizer (`spec`, from data_loader.from_config: the embedded corpus
    has its own sentencepiece model) in the checkpoint directory (checkpoint.keep_tokenizer),
    so its checkpoints generate text and convert to HF anywhere. A tokenizer with more tokens
    than the model cannot be the one the token files were made with: nothing is recorded (a
    warning says so) rather than a wrong tokenizer."""
    what = (f"config.data.tokenizer={spec!r}" if spec == config.data.tokenizer
            else "the embedded corpus's tokenizer")
    try:
        record, data = checkpoint.tokenizer_record(spec)
        if record["vocab_size"] > config.model.vocab_size:
            logging.warning(
                "%s has %d tokens, more than config.model.vocab_size=%d, so it is not the "
                "tokenizer of these token files: the checkpoints record no tokenizer (set "
                "config.data.tokenizer to the one the files were made with)", what,
                record["vocab_size"], config.model.vocab_size)
            return None
        checkpoint.keep_tokenizer(directory, record, data, what)
        return record
    except checkpoint.CheckpointError:
        raise
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"{what}: {e}; the checkpoints keep the tokenizer they were "
                                     "trained with, so it must be readable") from e


class _Preemption:
    """Turns SIGTERM (how TPU VMs and SLURM preempt) into a flag the loop checks after each
    step. Every process must stop at the same step, so with several processes the flag is
    agreed (any process signalled -> all stop) every `log_every` steps."""

    def __init__(self):
        self._flag = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def requested(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Saver:
    """Decides when to save (every_steps, every_seconds, the last step), refuses to write
    a state with non-finite parameters, and turns a failed save into CheckpointSaveError
    (checkpoint.save_failed: the cause, the disk, the fix and the step a rerun resumes
    from). An async save's outcome is checked at every step boundary (`check`), so a run
    whose save failed stops at the next step, not at the next save."""

    def __init__(self, manager, data_iter, meta: dict, options):
        self.manager, self.data_iter, self.meta, self.options = manager, data_iter, meta, options
        self.last_time = time.monotonic()
        self.last_step = manager.latest_step()
        self.pending = None  # step of the async save whose outcome is not checked yet
        self.error = None  # its failure, until every process has agreed to stop

    def due(self, step: int, total: int, sync_every: int) -> bool:
        every_s = self.options.every_seconds
        timed = bool(every_s) and time.monotonic() - self.last_time >= every_s
        if every_s and jax.process_count() > 1:  # clocks differ: process 0 decides for all,
            from jax.experimental import multihost_utils  # on steps all processes agree on
            timed = step % sync_every == 0 and bool(
                multihost_utils.broadcast_one_to_all(np.array(timed)))
        return step % self.options.every_steps == 0 or step == total or timed

    def save(self, step: int, state) -> bool:
        if step == self.last_step:
            return True
        if not bool(guard_lib.all_finite(state.params)):
            logging.error("step %d: parameters are not finite; not saving this state", step)
            return False
        self.settle()  # the previous save's outcome first, so a failure names its own step
        try:
            checkpoint.save(self.manager, step, state, self.data_iter, dict(self.meta, step=step))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/OS errors of every type
            raise checkpoint.save_failed(self.manager, step, e, state) from e
        self.pending = step if self.options.async_save else None
        self.last_time, self.last_step = time.monotonic(), step
        return True

    def _wait(self) -> None:
        """Waits for the save in flight; keeps its failure (CheckpointSaveError) in .error."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step = self.last_step if self.pending is None else self.pending
            self.error = checkpoint.save_failed(self.manager, step, e)
            self.error.__cause__ = e
        self.pending = None

    def _raise_if_failed(self) -> None:
        """Raises the failure of a save; with several processes all agree (any failed -> all
        raise), so every process stops at the same step. Collective: all processes call it
        at the same steps."""
        failed = self.error is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            failed = bool(np.any(multihost_utils.process_allgather(np.array(failed))))
        if failed:
            raise self.error or checkpoint.CheckpointSaveError(
                f"saving checkpoint step {self.last_step} failed on another process (its "
                "error.log names the cause); fix it, then rerun with the same --workdir")

    def settle(self) -> None:
        """Waits for the save in flight; raises CheckpointSaveError if it failed."""
        self._wait()
        self._raise_if_failed()

    def check(self, step: int, sync_every: int) -> None:
        """Raises CheckpointSaveError once the async save in flight has failed, without
        waiting for one still being written: at this step with one process; with several,
        at the next multiple of `sync_every` (where the processes agree)."""
        if (self.pending is not None and self.error is None
                and not self.manager.is_saving_in_progress()):
            self._wait()  # the save thread is done: no wait, only its outcome
        if jax.process_count() == 1 or step % sync_every == 0:
            self._raise_if_failed()


def _note_skip(step: int, skipped, bad_run: int) -> int:
    """Logs a skipped step (read one step late) and returns the run of skipped steps."""
    if float(skipped):
        logging.warning("step %d skipped: non-finite or spiking loss / grad norm", step)
        return bad_run + 1
    return 0


def _rollback(manager, abstract, data_iter, config, writer, step: int):
    """Reloads the last committed checkpoint and skips `rollback_skip_batches` batches past
    its data position. Returns (state, step to continue from)."""
    manager.wait_until_finished()
    good = manager.latest_step()
    if good is None:
        raise FloatingPointError(
            f"step {step}: {config.train.rollback_after} bad steps in a row and no checkpoint "
            "to roll back to; lower config.checkpoint.every_steps or inspect the data")
    state, _ = checkpoint.restore(manager, good, abstract, data_iter)
    for _ in range(config.train.rollback_skip_batches):
        next(data_iter)
    logging.warning("rollback at step %d: reloaded step %d and skipped %d batches", step, good,
                    config.train.rollback_skip_batches)
    writer.rewind(good)
    return state, good


def _to_global(local: dict, batch_sharding) -> dict:
    """This process's share of the batch -> global arrays. The host arrays are copied
    first: Grain workers hand out shared memory that is recycled after the next read."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.array(v, copy=True))
            for k, v in local.items()}


def _check_init_from(config) -> str:
    """The checkpoint dir of config.train.init_from, after checking its model shape matches
    (before anything compiles)."""
    try:
        directory = checkpoint.resolve_dir(config.train.init_from)
        saved = checkpoint.read_meta(directory, step_flag=None)["config"]["model"]
    except (FileNotFoundError, ValueError) as e:
        raise config_lib.ConfigError(f"config.train.init_from: {e}") from e
    keys = ("vocab_size", "padded_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
            "mlp_hidden", "scan_layers")
    diff = [f"model.{k}={config.model[k]!r} (checkpoint: {saved.get(k)!r})" for k in keys
            if saved.get(k) != config.model[k]]
    saved_hd = saved.get("head_dim") or saved["d_model"] // saved["n_heads"]
    if saved_hd != config_lib.head_dim(config.model):
        diff.append(f"model.head_dim={config_lib.head_dim(config.model)} (checkpoint: {saved_hd})")
    if diff:
        raise config_lib.ConfigError(
            f"config.train.init_from={config.train.init_from}: the model differs from the "
            f"checkpoint's: {', '.join(diff)}; set these to the checkpoint's values")
    _warn_config_changes(saved, config.model.to_dict(), "config.model")
    return directory


def _warn_config_changes(saved: dict, current: dict, prefix: str = "config") -> None:
    """Resuming under a changed config is allowed (e.g. more steps) but never silent."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}.{key}")
        elif a != b:
            logging.warning("resuming with %s.%s=%r (the checkpoint was written with %r)",
                            prefix, key, b, a)


def _emit(writer, step, step_metrics, mark, tokens_per_step, flops_per_token, peak, n_devices):
    """Writes one step's metrics. Throughput covers the steps since the previous emit (the
    first window after a (re)start includes compilation)."""
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    now = time.perf_counter()
    seconds = (now - mark[1]) / (step - mark[0])
    m["step_time_s"] = seconds
    m["tokens_per_s"] = tokens_per_step / seconds
    m["mfu"] = m["tokens_per_s"] * flops_per_token / (peak * n_devices) if peak else None
    writer.write(step, m)
    return dict(m, step=step), (step, now)
