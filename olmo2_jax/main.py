"""Entry point: `python -m olmo2_jax.main --config=configs/tiny.py --workdir=DIR`.

Intentionally short: it parses flags, sets up multi-host JAX, and hands off to a stage.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import traceback

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
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 shows it
    config = _CONFIG.value
    if config is None:
        sys.exit("error: --config is required, e.g. --config=configs/tiny.py")
    from olmo2_jax import config as config_lib

    try:
        if _DRY_RUN.value:
            for k, v in dry_run(config).items():
                print(f"{k}={v}")
            return
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required (a local path; checkpoints can go to gs:// with "
                 "--config.checkpoint.directory)")
    if config.stage != "pretrain":
        sys.exit(f"error: config.stage={config.stage!r}: only 'pretrain' is available in this "
                 "version")
    from olmo2_jax import checkpoint
    workdir = _WORKDIR.value
    log_dir = os.path.abspath(workdir) if "://" not in workdir else tempfile.gettempdir()
    # A failure prints one line (two with the log's path); its traceback and what orbax and
    # tensorstore print after a failed read or write go to <workdir>/error.log.
    with checkpoint.ErrorLog(os.path.join(log_dir, "error.log")) as log:
        try:
            if _DISTRIBUTED.value == "on" or (
                    _DISTRIBUTED.value == "auto"
                    and (any(v in os.environ for v in _CLUSTER_ENV) or _multi_host_tpu())):
                import jax
                jax.distributed.initialize()
            from olmo2_jax import train
            train.train(config, workdir)
        except (config_lib.ConfigError, FileNotFoundError) as e:  # CheckpointError(s) too
            log.fail(e)
        except Exception as e:  # noqa: BLE001
            if checkpoint.disk_full(e):  # e.g. metrics.jsonl on a full disk
                log.fail(e, checkpoint.disk_full_message(
                    e, workdir, "free space there or use a --workdir on another disk, then "
                    "rerun with the same --workdir to resume from its last checkpoint"))
            raise


# --- Flag errors: one line naming the flag (or config key), the bad value and the fix.

def _flag_value(argv, name: str) -> str | None:
    """The value given to --name in argv (the last one), if any."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _configs_listing(path: str) -> str:
    """The config files that exist, where `path` points (or the repository's configs/)."""
    folder = os.path.dirname(path)
    if not folder or not os.path.isdir(folder):
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs")
    try:
        names = sorted(f for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")
    except OSError:
        return ""
    shown = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else folder
    return ", ".join(os.path.join(shown, n) for n in names)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _raised_in_file(e: BaseException, path: str) -> bool:
    """Whether `e` itself was raised while running (or compiling) the file `path`."""
    path = os.path.abspath(path)
    if isinstance(e, SyntaxError) and os.path.abspath(e.filename or "") == path:
        return True
    return any(os.path.abspath(f.f_code.co_filename) == path
               for f, _ in traceback.walk_tb(e.__traceback__))


def _config_file_error(path: str, e: BaseException) -> str:
    """A --config file that does not exist or does not load."""
    if not os.path.isfile(path):
        listing = _configs_listing(path)
        return f"--config={path}: no such file" + (f"; the configs are {listing}" if listing
                                                    else "")
    cause = next((x for x in _chain(e) if _raised_in_file(x, path)), None)
    if cause is None:
        cause = list(_chain(e))[-1]
    if isinstance(cause, SyntaxError):
        return f"--config={path}: line {cause.lineno}: SyntaxError: {cause.msg}"
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    if "Error whilst parsing config file" in str(cause) and lines:
        return f"--config={path}: loading it raised {lines[-1]}"  # ml_collections' trace
    line = next((n for f, n in traceback.walk_tb(cause.__traceback__)
                 if os.path.abspath(f.f_code.co_filename) == os.path.abspath(path)), None)
    where = f" at line {line}" if line else ""
    return f"--config={path}: loading it raised {type(cause).__name__}{where}: " + (
        lines[-1] if lines else "")


def _unknown_key(argv, config) -> str | None:
    """The first --config.a.b override that names no key of `config`, with close matches."""
    import ml_collections
    for arg in argv[1:]:
        m = re.match(r"--(?:no)?config\.([^=]+)", arg)
        if not m:
            continue
        parts, node = m.group(1).split("."), config
        for i, part in enumerate(parts):
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            parent = ".".join(["config", *parts[:i]])
            if not isinstance(node, ml_collections.ConfigDict):
                return (f"--config.{m.group(1)}: {parent} is a value, not a section; set it "
                        f"with --{parent}=...")
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            hint = (f"did you mean {' or '.join(f'{parent}.{k}' for k in close)}?" if close
                    else f"the keys of {parent} are {', '.join(keys)}")
            return f"--config.{m.group(1)}: {parent} has no key {part!r}; {hint}"
    return None


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false",
          "string": "a string"}


def _flag_error(argv, e: BaseException) -> str:
    """One line for a flag that absl or ml_collections refused (or a config file that did not
    load): the flag, the value, and the fix."""
    path = _flag_value(argv, "config")
    if path is not None:
        path = path.split(":", 1)[0]  # configs/x.py:arg passes arg to get_config
    if isinstance(e, flags.IllegalFlagValueError):
        m = re.match(r"flag --([^=\s]+)=", str(e))
        name = m.group(1) if m else ""
        if name == "config" and path:
            return _config_file_error(path, e)
        given = _flag_value(argv, name)
        reason = str(e).splitlines()[0][len(m.group(0)) if m else 0:]
        if given is not None and reason.startswith(given + ": "):
            reason = reason[len(given) + 2:]
        if name.startswith("config.") and name in flags.FLAGS:
            flag = flags.FLAGS[name]
            if "ConfigDict" in type(flag.parser).__name__:  # a whole section given one value
                return (f"--{name}={given}: {name} is a section; set its keys one by one, "
                        f"e.g. --{name}.<key>=<value>")
            kind = _KINDS.get(flag.flag_type())
            example = str(flag.value).lower() if isinstance(flag.value, bool) else flag.value
            return (f"--{name}={given}: expected {kind or flag.flag_type() + ' (' + reason + ')'}"
                    f", e.g. --{name}={example} (the config's value)")
        return f"--{name}={given}: {reason}"
    if isinstance(e, flags.UnrecognizedFlagError):
        name = getattr(e, "flagname", "") or str(e)
        known = [n for n in flags.FLAGS if "." not in n]
        close = difflib.get_close_matches(name, known, n=2)
        return (f"unknown flag --{name}"
                + (f"; did you mean {' or '.join('--' + c for c in close)}?" if close else "")
                + " (python -m olmo2_jax.main --helpshort lists the flags)")
    if path is not None and (not os.path.isfile(path)
                             or any(_raised_in_file(x, path) or isinstance(x, OSError)
                                    for x in _chain(e))):
        return _config_file_error(path, e)
    if isinstance(e, (KeyError, AttributeError)) and path is not None:
        import runpy
        found = _unknown_key(argv, runpy.run_path(path)["get_config"]())
        if found:
            return found
    if isinstance(e, flags.Error):
        return " ".join(str(e).split())
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {' '.join(str(text).split())}"


def _parse_flags(argv):
    """absl's parser, but a bad flag, config file, config key or value prints one line naming
    it and the fix, not a traceback (ml_collections defers a config file's load error to the
    first use of the config: it is raised here, before anything runs)."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None:
            config.get("stage")
        return rest
    except Exception as e:  # noqa: BLE001 - every parse failure gets one line
        try:
            message = _flag_error(argv, e)
        except Exception:  # noqa: BLE001 - explaining must never hide the error itself
            message = " ".join(str(e).split())
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
