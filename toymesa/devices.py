"""Placing populations on devices with JAX's own distribution.

A population's leading axis (members) is split over every device in a one-axis mesh
``("pop",)``: members are independent, so XLA partitions the vmapped program with no
communication. The same code serves one CPU, N forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), a GPU, and several hosts once
`jax.distributed.initialize()` has run (then `jax.devices()` spans every process and each
process feeds and fetches only its own shards).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "pop"


def mesh() -> Mesh:
    """A one-axis mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def n_devices() -> int:
    return jax.device_count()


def shard(x, m: Mesh | None = None):
    """Put a host array (same value on every process) on the mesh, split along axis 0."""
    m = mesh() if m is None else m
    x = np.asarray(x)
    sharding = NamedSharding(m, PartitionSpec(AXIS))
    if x.shape[0] % m.size:
        raise ValueError(f"a population of {x.shape[0]} cannot be split evenly over {m.size} devices; pad it to a multiple of {m.size}")
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_population(seeds, hparams, m: Mesh | None = None):
    """(seeds, hparams) of a population as arrays split over the mesh (sizes must divide)."""
    m = mesh() if m is None else m
    return shard(np.asarray(seeds, np.int32), m), type(hparams)(*(shard(np.asarray(v, np.float32), m) for v in hparams))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process sharded) array as one NumPy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_writer() -> bool:
    """Only process 0 writes results; every process computes."""
    return jax.process_index() == 0


def describe() -> dict:
    d = jax.devices()
    return {"platform": d[0].platform, "device_kind": d[0].device_kind, "n_devices": len(d), "n_processes": jax.process_count()}
