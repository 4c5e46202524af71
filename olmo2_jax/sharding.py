"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: "data" (pure data parallel, params replicated), "fsdp" (data parallel with
params, gradients and optimiser state sharded), "tensor" (Megatron-style tensor
parallel over heads / MLP hidden / vocab). Only this module and the configs name them.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from olmo2_jax import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Order matters: flax assigns rules in this order and skips a
# mesh axis already used by the array, so activations ("batch", "seq", "embed") shard the
# batch over data+fsdp and leave embed whole, while weights shard embed over fsdp.
RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("seq", None),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(config, devices=None) -> Mesh:
    """Mesh from config.mesh over `devices` (default: all), topology-aware on TPU."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config_lib.mesh_shape(config, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(dims, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(dims)  # CPU / odd topologies: plain order
    return Mesh(grid, MESH_AXES)


def inference_mesh(devices=None) -> Mesh:
    """All (given) devices on the fsdp axis: for reading checkpoints written on any mesh."""
    import ml_collections
    return make_mesh(ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": -1, "tensor": 1}}),
                     devices)


def logical_shardings(mesh: Mesh, tree):
    """NamedShardings for a tree of (boxed or abstract) values with logical names."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over data+fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _names(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def split_rows(axes: tuple[str, ...]):
    """How a row-wise kernel over logical `axes` of a (batch, seq, *axes) activation (a norm,
    the loss's softmax) splits over the ambient mesh: (mesh axes of the rows, their number
    of shards, None), or a reason the per-shard kernel cannot run (features or sequence
    split) in place of None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return (), 1, None
    spec = nn.logical_to_mesh_axes(("batch", "seq", *axes))

    def split(entry):  # the mesh axes of one spec entry that really split it
        return tuple(a for a in _names(entry) if mesh.shape[a] > 1)

    if split(spec[1]):
        return (), 1, f"the sequence is split over mesh axes {split(spec[1])}"
    if any(split(e) for e in spec[2:]):
        return (), 1, f"its features are split over mesh axes {sum(map(split, spec[2:]), ())}"
    rows = split(spec[0])
    return rows, math.prod(mesh.shape[a] for a in rows), None


def shards(entry) -> int:
    """How many pieces one PartitionSpec entry cuts its dim into on the ambient mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in _names(entry))


def local_shape(shape: tuple[int, ...], axes: tuple[str, ...]):
    """(PartitionSpec over the ambient mesh, or None without one; the per-device shape) of an
    activation of `shape` with logical `axes`: what a kernel run per shard sees."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None, tuple(shape)
    spec = P(*nn.logical_to_mesh_axes(axes))
    return spec, tuple(d // shards(e) for d, e in zip(shape, spec))
