"""Data parallelism: one device mesh over every device of every process, batches split along it.

The train and eval steps are plain `jax.jit` functions over global arrays: parameters,
optimizer state and BatchNorm statistics are replicated, each batch is sharded along the mesh
axis "data". XLA inserts the all-reduces, so gradients and BatchNorm batch statistics are those
of the whole global batch, exactly as on one device.

Multi-host: `initialize()` calls `jax.distributed.initialize` when the config or the standard
environment asks for it; each process reads its own slice of every global batch and
`global_batch` assembles the global array from the per-process pieces.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# host_devices=0 takes at most this many: measured on 2 cores only, where more devices than
# cores were slower (BENCHMARKS.md); ask for more with host_devices=N.
AUTO_MAX_HOST_DEVICES = 4

# Environment variables that mean "this is one process of several" (jax reads the same ones).
_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(config: ml_collections.ConfigDict | None = None) -> bool:
    """Joins a multi-process run when asked; returns whether it did.

    Asked means: `config.distributed.coordinator_address` is set (with `num_processes` and
    `process_id`), or $JAX_COORDINATOR_ADDRESS is (with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID),
    or `config.distributed.auto` is True (cluster auto-detection: SLURM, Open MPI, TPU pods).
    Must run before anything touches a device.
    """
    if not distributed_requested(config):
        return False
    dist = config.get("distributed") if config is not None else None
    address = (dist.coordinator_address if dist else "") or os.environ.get(_ENV_COORDINATOR, "")
    kwargs: dict[str, Any] = {}
    if address:
        num = (dist.num_processes if dist else 0) or int(os.environ.get(_ENV_NUM_PROCESSES, 0))
        pid = dist.process_id if dist and dist.process_id >= 0 else None
        if pid is None and _ENV_PROCESS_ID in os.environ:
            pid = int(os.environ[_ENV_PROCESS_ID])
        if not num or pid is None:
            from lggunet.errors import ConfigError

            raise ConfigError(
                f"distributed run at {address}: also give the number of processes and this "
                f"process's id (config.distributed.num_processes/process_id or "
                f"${_ENV_NUM_PROCESSES}/${_ENV_PROCESS_ID})"
            )
        kwargs = {"coordinator_address": address, "num_processes": num, "process_id": pid}
    # Collectives between CPU devices of different processes (harmless on GPU/TPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Process %d of %d; %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def distributed_requested(config: ml_collections.ConfigDict | None) -> bool:
    """Whether the config or the environment asks for a multi-process run."""
    dist = config.get("distributed") if config is not None else None
    address = (dist.coordinator_address if dist else "") or os.environ.get(_ENV_COORDINATOR, "")
    return bool(address or (dist and dist.auto))


def host_device_count(config: ml_collections.ConfigDict, cores: int | None = None) -> int:
    """How many JAX devices the CPU is split into: `config.host_devices`, or for 0 (auto) one
    per logical CPU this process may use, at most AUTO_MAX_HOST_DEVICES and as many as divide
    both batch sizes (1 in a multi-process run)."""
    asked = config.get("host_devices", 1)
    if asked or distributed_requested(config):
        return asked or 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    most = min(max(cores or 1, 1), AUTO_MAX_HOST_DEVICES)
    sizes = (config.batch_size, config.eval_batch_size)
    return max(n for n in range(1, most + 1) if all(b % n == 0 for b in sizes))


def use_host_devices(config: ml_collections.ConfigDict) -> int | None:
    """Splits the CPU into `host_device_count(config)` JAX devices; each runs its share of every
    batch, side by side (one device per core: 1.5-1.9x on 2 cores, BENCHMARKS.md). Call it
    before anything starts JAX (the command line and `train_and_evaluate` do). A host device
    count in XLA_FLAGS or $JAX_NUM_CPU_DEVICES wins. Returns the count set (None: left as it
    was). Harmless on GPU/TPU hosts: their CPU devices stay idle."""
    from lggunet.errors import ConfigError

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    count = host_device_count(config)
    if os.environ.get("JAX_NUM_CPU_DEVICES") or count <= 1:  # <= 1: JAX's own default
        return None
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % count:
            raise ConfigError(
                f"host_devices={count}: {name}={config[name]} must divide among the devices; "
                "use a divisor of both batch sizes, or 0 (one device per core)"
            )
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except AttributeError:  # a JAX without the option (older than 0.5)
        logging.warning("host_devices=%d: this JAX cannot split the CPU; 1 device", count)
        return None
    except RuntimeError:  # JAX has started (a caller's own code): too late to split the CPU
        if jax.default_backend() == "cpu" and jax.device_count() != count:
            logging.warning(
                "host_devices: JAX started with %d CPU devices before it could ask for %d; "
                "call lggunet.parallel.use_host_devices(config) before anything uses JAX",
                jax.device_count(),
                count,
            )
        return None
    return count


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, TensorBoard events and pictures."""
    return jax.process_index() == 0


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices (every process), axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over "data". The global batch is
    the concatenation of the processes' rows in process order."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host data that every process holds whole -> arrays replicated on every device."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def steps_must_sync() -> bool:
    """True where the host must wait for each train step before dispatching the next: XLA's
    CPU all-reduce across several devices deadlocked with many steps in flight."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them (a collective call)."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (a collective call)."""
    if jax.process_count() == 1:
        return value
    values = multihost_utils.process_allgather(np.asarray([value], np.int32))
    return int(np.max(values))


def barrier(name: str) -> None:
    """Waits until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
