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


def make_manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """A manager over `directory` (local path or gs://) keeping the last `keep` steps."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options,
                                 item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
    """Starts a save (async if configured); the iterator state is captured before it returns."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**args))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """Restores (state, meta) at `step` into the shardings of `abstract_state`; the data
    iterator is restored in place."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["meta"]


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
