"""Entry point: `python -m olmo2_jax.main --config=configs/tiny.py --workdir=DIR`.

Intentionally short: it parses flags, sets up multi-host JAX, and hands off to a stage.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print params=<count> and flops_per_token=<int>; allocate nothing.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): auto = when a cluster environment is detected.")

# Environment variables that mean "one process of several": JAX's own, SLURM, TPU pods.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def _multi_host_tpu() -> bool:
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def dry_run(config) -> dict:
    """Builds the model abstractly (jax.eval_shape) and checks the count against the formula."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from olmo2_jax import config as config_lib
    from olmo2_jax.model import ModelConfig, Transformer

    config_lib.validate(config)
    model = Transformer(ModelConfig.from_config(config.model))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    params = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(abstract)))
    expected = config_lib.count_params(config.model)["total"]
    if params != expected:
        raise AssertionError(f"model has {params} params but the formula gives {expected}")
    out = {"params": params,
           "flops_per_token": config_lib.flops_per_token(config.model, config.data.seq_len)}
    out["tokens_per_step"] = config.train.global_batch_size * config.data.seq_len
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 shows it
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    from olmo2_jax import config as config_lib

    try:
        if _DRY_RUN.value:
            for k, v in dry_run(config).items():
                print(f"{k}={v}")
            return
        if not _WORKDIR.value:
            raise app.UsageError("--workdir is required (a local path; checkpoints can go to "
                                 "gs:// with --config.checkpoint.directory)")
        if _DISTRIBUTED.value == "on" or (
                _DISTRIBUTED.value == "auto"
                and (any(v in os.environ for v in _CLUSTER_ENV) or _multi_host_tpu())):
            import jax
            jax.distributed.initialize()
        if config.stage != "pretrain":
            raise config_lib.ConfigError(
                f"config.stage={config.stage!r}: only 'pretrain' is available in this version")
        from olmo2_jax import train
        train.train(config, _WORKDIR.value)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def _parse_flags(argv):
    """absl's parser, but an unknown --config.x.y prints one clear line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"error: unknown config field {e} in {', '.join(overrides)}; the fields are "
                 "those of olmo2_jax/config.py:base_config() (and the config file)")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
