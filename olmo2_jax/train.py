"""TrainState, the pure `train_step(state, batch) -> (state, metrics)`, and the host loop."""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
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
from olmo2_jax import metrics as metrics_lib
from olmo2_jax import optim, sharding
from olmo2_jax.loss import fused_lm_head_loss, loss_sums
from olmo2_jax.model import ModelConfig, Transformer


@struct.dataclass
class TrainState:
    step: jax.Array  # optimiser updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, for stages that sample (kept so resumes are exact)


def init_state(model: Transformer, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state with boxed (logically annotated) leaves; unbox after sharding."""
    params_rng, state_rng = jax.random.split(rng)
    # Attention has no parameters: initialise through XLA attention so a kernel's shape
    # constraints (e.g. Pallas under shard_map) never meet the 1x1 init batch.
    init_model = model.clone(cfg=dataclasses.replace(model.cfg, attention="xla"))
    params = init_model.init(params_rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)


def state_shardings(model, tx, mesh, rng):
    """(abstract unboxed state with shardings, shardings), without allocating anything."""
    abstract = jax.eval_shape(functools.partial(init_state, model, tx), rng)
    shardings = sharding.logical_shardings(mesh, abstract)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    plain = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract, is_leaf=is_box)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            plain, shardings)
    return abstract, shardings


def create_state(model, tx, mesh, rng):
    """Initialises the state directly sharded: no device ever holds the whole of it."""
    _, shardings = state_shardings(model, tx, mesh, rng)
    init = jax.jit(lambda r: nn.unbox(init_state(model, tx, r)), out_shardings=shardings)
    return init(rng), shardings


def make_train_step(model: Transformer, tx, schedule, *, accum_steps: int, z_loss_weight: float,
                    loss_chunks: int = 0, mesh=None):
    """Returns the pure train_step. With accum_steps > 1 the batch is split into that many
    micro-batches, scanned with summed gradients, and normalised by the total count of
    loss tokens, so the update equals that of the whole batch at once. loss_chunks > 0
    uses the fused LM-head loss (no [B, T, V] logits); 0 materialises the logits."""

    def loss_fn(params, batch):
        args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        if loss_chunks:
            hidden = model.apply({"params": params}, *args, method=Transformer.hidden)
            loss, ce, z, n = fused_lm_head_loss(hidden, params["lm_head"], batch["targets"],
                                                batch["loss_mask"], z_loss_weight, loss_chunks)
            return loss, (ce, z, n)
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
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates))
        metrics = {"loss": ce / denom, "z_loss": z_loss_weight * z / denom,
                   "grad_norm": optim.global_norm(grads), "lr": schedule(state.step),
                   "loss_tokens": n}
        metrics["total_loss"] = metrics["loss"] + metrics["z_loss"]
        return new_state, metrics

    return train_step


def _data_tokenizer(config):
    from olmo2_jax.data.tokenizer import load_tokenizer
    try:
        tok = load_tokenizer(config.data.tokenizer)
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(f"config.data.tokenizer={config.data.tokenizer!r}: {e}") from e
    if tok.vocab_size > config.model.vocab_size:
        raise config_lib.ConfigError(
            f"config.data.tokenizer={config.data.tokenizer!r} has {tok.vocab_size} tokens but "
            f"config.model.vocab_size={config.model.vocab_size}; raise the model's vocab_size")
    return tok


def _mix_sources(config):
    from olmo2_jax.data import mixture
    try:
        return mixture.read_mix(config.data.mix, tokenizer_id=_data_tokenizer(config).name,
                                base=config.data.mix_base)
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(f"config.data.mix: {e}") from e


def resolve_data(config) -> tuple[list[str], int | None]:
    """(token files, tokenizer vocab or None). No paths -> the embedded default corpus."""
    if config.data.mix:
        return [p for s in _mix_sources(config) for p in s.paths], None
    if not config.data.paths:
        from olmo2_jax.data import corpus
        files = corpus.prepare_default_corpus(vocab_size=config.data.corpus_vocab_size)
        if config.model.vocab_size != config.data.corpus_vocab_size:
            raise config_lib.ConfigError(
                f"the embedded corpus has a {config.data.corpus_vocab_size}-token vocabulary but "
                f"config.model.vocab_size={config.model.vocab_size}; set "
                f"--config.model.vocab_size={config.data.corpus_vocab_size} "
                "(and padded_vocab_size), or point config.data.paths at your own token files")
        return [files.tokens_path], config.data.corpus_vocab_size
    paths = []
    for pattern in (p.strip() for p in config.data.paths.split(",") if p.strip()):
        found = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not found:
            raise FileNotFoundError(f"config.data.paths: {pattern!r} matches no file")
        paths.extend(found)
    return paths, None


def make_data_iterator(config, paths: list[str]):
    """The Grain iterator of per-process batches; bad files surface as a ConfigError."""
    from olmo2_jax.data import mixture, pipeline
    d = config.data
    if d.document_masking:
        if d.mix or d.paths:
            eos_id = _data_tokenizer(config).eos_id
        else:
            from olmo2_jax.data import corpus
            eos_id = corpus.EOS_ID
    instance = pipeline.InstanceOptions(
        eos_id=eos_id if d.document_masking else None, document_masking=d.document_masking,
        ngram_max_period=d.ngram_max_period, ngram_min_repeats=d.ngram_min_repeats)
    mix = {}
    if d.mix:
        sources = _mix_sources(config)
        try:
            mix = {"sources": sources}
            if d.weights:
                mix["weights"] = mixture.source_weights(sources, d.weights)
            if d.repeats:
                mix["repeats"] = mixture.source_repeats(sources, d.repeats)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        paths = None
    try:
        return pipeline.make_iterator(
            paths, seq_len=d.seq_len, global_batch_size=config.train.global_batch_size,
            seed=d.seed, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=d.num_workers,
            vocab_size=config.model.vocab_size, instance=instance, **mix)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.data.{'mix' if d.mix else 'paths'}: {e}") from e


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training to config.train.steps; returns the last logged metrics."""
    config_lib.validate(config, jax.device_count())
    paths, _ = resolve_data(config)
    mesh = sharding.make_mesh(config)
    model = Transformer(ModelConfig.from_config(config.model))
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    t = config.train
    accum = t.global_batch_size // config_lib.micro_batch_size(config)
    flops_per_token = config_lib.flops_per_token(config.model, config.data.seq_len)
    peak = t.peak_flops_per_device or metrics_lib.peak_flops_per_device()
    tokens_per_step = t.global_batch_size * config.data.seq_len

    init_from = _check_init_from(config) if t.init_from else None
    data_iter = make_data_iterator(config, paths)
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"),
                                      keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    rng = jax.random.PRNGKey(t.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        abstract, shardings = state_shardings(model, tx, mesh, rng)
        start = manager.latest_step()
        if start is None:
            state, _ = create_state(model, tx, mesh, rng)
            if init_from:
                state = state.replace(params=checkpoint.load_params(
                    init_from, model.cfg, mesh))
            start = 0
        else:
            state, meta = checkpoint.restore(manager, start, abstract, data_iter)
            _warn_config_changes(meta.get("config", {}), config.to_dict())
        batch_sharding = sharding.batch_sharding(mesh)
        if jax.process_index() == 0:
            n_params = config_lib.count_params(config.model)["total"]
            print(f"olmo2_jax: {n_params:,} params | mesh {dict(mesh.shape)} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} devices | "
                  f"{tokens_per_step:,} tokens/step, {accum} micro-batch(es) | "
                  f"{'resuming from step ' + str(start) if start else 'fresh start'} | "
                  f"workdir {workdir}", flush=True)
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, accum_steps=accum,
                            z_loss_weight=t.z_loss_weight, loss_chunks=t.loss_chunks, mesh=mesh),
            in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
            donate_argnums=(0,))
        writer = metrics_lib.MetricsWriter(workdir, total_steps=t.steps, start_step=start,
                                           enabled=jax.process_index() == 0)
        meta = {"config": config.to_dict()}
        last, pending = {}, None
        mark = (start - 1, time.perf_counter())  # (step, time) of the last emitted metrics
        try:
            for step in range(start, t.steps):
                batch = _to_global(next(data_iter), batch_sharding)
                state, step_metrics = step_fn(state, batch)
                # Metrics are read one step late, so the host never waits on the device.
                if pending is not None:
                    last, mark = _emit(writer, *pending, mark, tokens_per_step, flops_per_token,
                                       peak, mesh.size)
                    pending = None
                if step % t.log_every == 0 or step == t.steps - 1 or step == start:
                    pending = (step, step_metrics)
                writer.advance()
                if (step + 1) % config.checkpoint.every_steps == 0 or step + 1 == t.steps:
                    checkpoint.save(manager, step + 1, state, data_iter, dict(meta, step=step + 1))
            if pending is not None:
                last, mark = _emit(writer, *pending, mark, tokens_per_step, flops_per_token, peak,
                                   mesh.size)
            manager.wait_until_finished()
        finally:
            writer.close()
            manager.close()
            if hasattr(data_iter, "close"):
                data_iter.close()
    return last


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
        saved = checkpoint.read_meta(directory)["config"]["model"]
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
