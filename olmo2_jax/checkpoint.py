"""Orbax checkpoints holding two items: the train state and the data iterator.

Saving both together is what makes a resume exact: the restored iterator yields the
very batch the interrupted run would have read next. Orbax writes each step into a
temporary directory and renames it on commit, so a save killed half-way is never
listed by `latest_step()`.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from olmo2_jax.config import ConfigError


def make_manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """A manager over `directory` (local path or gs://) keeping the last `keep` steps."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
        try:  # checked now, not at the first save after a long compile
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"no write permission on {directory}")
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {directory!r} is not usable "
                                  f"({type(e).__name__}: {e}); pass a writable --workdir") from e
    elif not directory.startswith("gs://"):
        raise CheckpointError(f"checkpoint directory {directory!r}: only local paths and gs:// "
                              "are supported")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    try:
        return ocp.CheckpointManager(epath.Path(directory), options=options,
                                     item_names=("state", "data", "meta"))
    except ImportError as e:
        raise CheckpointError(f"checkpoint directory {directory!r} needs gcsfs: "
                              "pip install 'olmo2_jax[gcs]'") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint directory {directory!r} is not usable "
                              f"({type(e).__name__}: {e}); pass a writable --workdir") from e


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
    """Starts a save (async if configured); the iterator state is captured before it returns."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**args))


class CheckpointError(ConfigError):
    """A checkpoint cannot be used; the message names what differs and the fix."""


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter,
            config: dict | None = None):
    """Restores (state, meta) at `step` into the shardings of `abstract_state`; the data
    iterator is restored in place. A checkpoint that does not fit (other model shape,
    missing or extra tensors, unreadable) raises CheckpointError naming the difference."""
    path = manager.directory / str(step)
    problems = _mismatches(path / "state", abstract_state)
    if problems:
        raise CheckpointError(_explain(path, problems, _saved_config(manager, step), config))
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for bad files
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}); it is corrupted "
            "or incomplete: delete that step directory to resume from the one before") from e
    return restored["state"], restored["meta"]


def _path_key(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def _mismatches(state_dir, abstract_state) -> list[str]:
    """Tensors missing, extra or of another shape/dtype in the saved state, by name."""
    try:
        tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {state_dir.parent} has no readable state metadata ({type(e).__name__}: "
            f"{e}); it is corrupted or incomplete: delete that step directory to resume from "
            "the one before") from e
    saved = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    out = [f"missing tensor {k}" for k in sorted(set(wanted) - set(saved))]
    out += [f"unexpected tensor {k}" for k in sorted(set(saved) - set(wanted))]
    for k in sorted(set(saved) & set(wanted)):
        a, b = saved[k], wanted[k]
        if tuple(getattr(a, "shape", ())) != tuple(b.shape):
            out.append(f"{k}: saved shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    return out


def _saved_config(manager, step) -> dict:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"].get("config", {})
    except Exception:  # noqa: BLE001
        return {}


def _explain(path, problems, saved: dict, current: dict | None) -> str:
    diffs = []
    if current:
        for section in ("model", "train"):
            a, b = saved.get(section, {}), current.get(section, {})
            diffs += [f"config.{section}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                      and (section == "model" or k.startswith("skip_"))]
    problems = sorted(problems, key=lambda p: "params." not in p.split(":")[0])
    shown = problems[:6] + ([f"... {len(problems) - 6} more"] if len(problems) > 6 else [])
    msg = f"checkpoint {path} does not fit this run"
    if diffs:
        msg += ": config differences: " + "; ".join(diffs) + ". Tensors"
    msg += ": " + "; ".join(shown)
    return msg + ". Use a config matching the checkpoint, or a new --workdir to start afresh"


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --- Reading checkpoints of any stage for inference and conversion (params + config only).

TOKENIZER_DIR = "tokenizer"  # tokenizer files stored beside the steps of a checkpoint dir


def resolve_dir(path: str) -> str:
    """The CheckpointManager directory: `path` itself, or `path/checkpoints` for a workdir."""
    if "://" not in path:
        path = os.path.abspath(path)
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if (p / "checkpoints").is_dir() and not _steps(p):
        p = p / "checkpoints"
    if not _steps(p):
        raise FileNotFoundError(f"{path!r} holds no checkpoint steps (expected numbered step "
                                "directories written by olmo2_jax, or a workdir with checkpoints/)")
    return str(p)


def _steps(p: epath.Path) -> list[int]:
    return sorted(int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit())


def _reader(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    manager = ocp.CheckpointManager(
        epath.Path(directory), item_names=("state", "meta"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    if step not in steps:
        raise FileNotFoundError(f"step {step} is not in checkpoint {directory} (steps: {steps})")
    return manager, step


def read_meta(directory: str, step: int | None = None) -> dict:
    """The JSON meta of a step (holds "config", the whole config as a dict)."""
    manager, step = _reader(directory, step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if "config" not in meta or "model" not in meta["config"]:
        raise ValueError(f"checkpoint {directory} step {step}: meta has no model config")
    return dict(meta, step=step)


def config_from_meta(meta: dict):
    """The saved config as a ConfigDict, over today's defaults (keys added since are filled)."""
    import ml_collections

    from olmo2_jax import config as config_lib
    c = config_lib.base_config()
    for section, values in meta["config"].items():
        if isinstance(values, dict) and isinstance(c.get(section), ml_collections.ConfigDict):
            for k, v in values.items():
                if k in c[section]:
                    c[section][k] = v
        elif section in c:
            c[section] = values
    return c


def model_config(meta: dict):
    from olmo2_jax.model import ModelConfig
    return ModelConfig.from_config(config_from_meta(meta).model)


def load_params(directory: str, cfg, mesh, step: int | None = None):
    """Only the params of a checkpoint (any stage: the optimiser state is not read), restored
    straight into the model's shardings on `mesh`."""
    import jax.numpy as jnp
    from flax import linen as nn

    from olmo2_jax import sharding
    from olmo2_jax.model import Transformer
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 1), jnp.int32))
    shardings = sharding.logical_shardings(mesh, abstract)["params"]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    # Unwrap the boxes by hand: nn.unbox would apply sharding constraints under a mesh.
    plain = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract, is_leaf=is_box)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          plain["params"], shardings)
    manager, step = _reader(directory, step)
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {directory} step {step}: its params do not match the model "
                         f"config saved with it ({e})") from e
    return restored["params"]


def check_new_dir(out: str) -> str:
    """`out` (made absolute when local) after checking that it holds no checkpoint: the
    writers of new checkpoints (`convert from_hf`, `soup`) never overwrite or mix steps."""
    if "://" not in out:
        out = os.path.abspath(out)
    p = epath.Path(out)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"--out={out} is a file; pick a new directory")
        held = sorted(c.name for c in p.iterdir() if c.name[:1].isdigit())
        held += ["checkpoints"] if (p / "checkpoints").exists() else []
        if held:
            raise CheckpointError(f"--out={out} already holds checkpoints ({', '.join(held[:3])}"
                                  f"{' ...' if len(held) > 3 else ''}); pick a new directory")
    return out


def write_params(out: str, params, meta: dict, *, step: int = 0,
                 tokenizer_files=()) -> str:
    """Writes a params-only checkpoint (state = {"params"}, meta with "config") at `step`
    into the new directory `out` (local or gs://), plus tokenizer files under tokenizer/:
    what `convert from_hf` and `soup` produce, and what `load_params`, `read_meta`,
    `train.init_from`, `generate` and `to_hf` read. Returns `out`."""
    out = check_new_dir(out)
    manager = make_manager(out, keep=1, async_save=False)
    try:
        save(manager, step, {"params": params}, None, dict(meta, step=step))
        manager.wait_until_finished()
    finally:
        manager.close()
    if tokenizer_files and jax.process_index() == 0:
        tok_dir = epath.Path(out) / TOKENIZER_DIR
        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in map(epath.Path, tokenizer_files):  # small files: read, then write anywhere
            (tok_dir / f.name).write_bytes(f.read_bytes())
    return out


def tokenizer_files(directory: str) -> list[str]:
    """The tokenizer files a checkpoint directory carries (see `write_params`)."""
    tok_dir = epath.Path(directory) / TOKENIZER_DIR
    return sorted(str(f) for f in tok_dir.iterdir() if f.is_file()) if tok_dir.is_dir() else []


class HFTokenizerFile:
    """A tokenizer.json (Hugging Face `tokenizers`) kept with a checkpoint: encode/decode."""

    def __init__(self, path: str, eos_id: int | None = None):
        from tokenizers import Tokenizer
        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(directory: str, meta: dict):
    """The tokenizer stored with the checkpoint (by `convert from_hf`), or None."""
    path = epath.Path(directory) / TOKENIZER_DIR / "tokenizer.json"
    if not path.exists():
        return None
    return HFTokenizerFile(str(path), meta.get("hf", {}).get("eos_token_id"))
