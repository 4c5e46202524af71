"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: "data" (pure data parallel, params replicated), "fsdp" (data parallel with
params, gradients and optimiser state sharded), "tensor" (Megatron-style tensor
parallel over heads / MLP hidden / vocab). Only this module and the configs name them.
"""

from __future__ import annotations

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
