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
