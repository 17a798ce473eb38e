"""Multi-controller runs: one Python process per host, all driving one global device mesh.

A run on P processes is the 1-process run with its work divided, never a different algorithm:

* Start-up (``initialize``): ``jax.distributed.initialize`` from ``config.distributed``: an
  explicit coordinator address / process count / process id, or (address empty) the cluster's
  own discovery (TPU pod slices, SLURM) when the environment names one; otherwise the run is
  the 1-process case. On CPU the cross-process collectives are gloo's.
* Environments and tasks (``owned_range``, ``EnvShare``): a batch of N episodes is split into
  P contiguous blocks of whole groups; process p builds and steps only its block's
  environments (global episode index i keeps seed ``config.seed + i``, its 1-process seed).
* Host data (``allgather``): each process's host objects (prompts of its live episodes, its
  finished rows) are exchanged through the coordination service's key-value store, with a
  timeout, so every process holds the global rows in the global order and every host decision
  (group filter, replay trigger, P50 baseline, subsample) runs identically everywhere.
* Device data (``global_array``, ``host_values``): device inputs are built from the global
  host batch with ``jax.make_array_from_callback`` (each process supplies its addressable
  slices); outputs sharded over other processes' devices are gathered back to the host.
* Writing: metrics, trajectories and config records are written by process 0 (``is_writer``).

A peer that dies or hangs: the coordination service's heartbeat ends the others within
``distributed.heartbeat_timeout_s``; a host exchange waits at most ``distributed.gather_timeout_s``
and raises ``PeerTimeoutError`` naming the processes it did not hear from.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Sequence

import jax
import numpy as np

_CLUSTER_VARIABLES = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_KEY_PREFIX = "spear_jax/allgather"


class PeerTimeoutError(RuntimeError):
    """A host exchange did not hear from every process in time."""


@dataclasses.dataclass
class _Exchange:
    """Counters of the host exchanges (every process makes the same calls in the same order)."""

    count: int = 0
    timeout_s: float = 600.0


_exchange = _Exchange()


def initialize(config) -> None:
    """Joins the run's processes (``config.distributed``; module docstring); a no-op when JAX's
    distributed runtime is already up or the run has one process. Must run before any device
    is touched."""
    d = config.distributed
    _exchange.timeout_s = float(d.gather_timeout_s)
    mode = join_mode(d, os.environ)
    if jax.distributed.is_initialized() or mode is None:
        return
    explicit = mode == "explicit"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; others keep theirs
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address or None,
        num_processes=d.num_processes if explicit else None,
        process_id=d.process_id if explicit else None,
        initialization_timeout=int(d.initialization_timeout_s),
        heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
        shutdown_timeout_seconds=int(d.shutdown_timeout_s))


def join_mode(d, environ) -> str | None:
    """How the processes meet: ``"explicit"`` (``d.coordinator_address`` set), ``"discovered"``
    (``environ`` names a TPU pod slice or a SLURM job of several tasks: JAX finds the coordinator,
    the count and the rank) or None (one process, nothing to join)."""
    if d.coordinator_address:
        if not 0 <= d.process_id < d.num_processes:
            from spear_jax.run_config import ConfigError

            raise ConfigError(f"config.distributed.process_id={d.process_id} must be in [0, "
                             f"config.distributed.num_processes={d.num_processes})")
        return "explicit"
    if any(environ.get(v) for v in _CLUSTER_VARIABLES) and int(environ.get("SLURM_NTASKS", "2")) > 1:
        return "discovered"
    return None


def owned_range(count: int, groups: int = 1, process: int | None = None,
                processes: int | None = None) -> range:
    """The global indices [lo, hi) of ``count`` items (in blocks of ``groups`` consecutive items
    that stay together) that ``process`` of ``processes`` owns: blocks dealt in contiguous runs,
    the first ``blocks % processes`` processes one block more."""
    process = jax.process_index() if process is None else process
    processes = jax.process_count() if processes is None else processes
    blocks = count // groups
    if blocks * groups != count:
        raise ValueError(f"{count} items are not whole groups of {groups}")
    base, extra = divmod(blocks, processes)
    lo = process * base + min(process, extra)
    hi = lo + base + (process < extra)
    return range(lo * groups, hi * groups)


def is_writer() -> bool:
    """True on the process that writes shared files (metrics, trajectories, config records)."""
    return jax.process_index() == 0


def allgather(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object), in process order; the same list on every
    process. Raises ``PeerTimeoutError`` after ``distributed.gather_timeout_s`` without a peer."""
    if jax.process_count() == 1:
        return [value]
    from jax._src.distributed import global_state

    client, me = global_state.client, jax.process_index()
    _exchange.count += 1
    key = f"{_KEY_PREFIX}/{_exchange.count}"
    client.key_value_set_bytes(f"{key}/{me}", pickle.dumps(value))
    values, missing = [], []
    for process in range(jax.process_count()):
        try:
            values.append(value if process == me else pickle.loads(client.blocking_key_value_get_bytes(
                f"{key}/{process}", int(_exchange.timeout_s * 1000))))
        except Exception as error:  # the client raises a backend-specific error type on a timeout
            missing.append(f"{process} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    if missing:
        raise PeerTimeoutError(
            f"process {me}: no answer within distributed.gather_timeout_s={_exchange.timeout_s:g}s from "
            f"process(es) {', '.join(missing)} in host exchange {_exchange.count}; a peer died or hangs: "
            "end the run and resume it from its last checkpoint")
    if _exchange.count > 1:  # every peer has finished reading the previous exchange
        client.key_value_delete(f"{_KEY_PREFIX}/{_exchange.count - 1}/{me}")
    return values


def barrier(name: str) -> None:
    """Returns once every process has reached the barrier (``name`` is for the reader); raises
    ``PeerTimeoutError`` like ``allgather``."""
    allgather(name)


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array whose value is ``host`` (the same on every process), laid out by
    ``sharding``: each process fills its addressable shards from its own copy."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def global_arrays(tree, sharding: jax.sharding.Sharding):
    """``global_array`` of every leaf of ``tree``."""
    return jax.tree.map(lambda leaf: global_array(leaf, sharding), tree)


def host_values(tree):
    """Every array of ``tree`` as numpy on this process: arrays with shards on other processes
    are gathered (one collective, the same call on every process)."""
    from jax.experimental import multihost_utils

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


class SilentWriter:
    """The metrics writer of a process other than 0: the records are process 0's to write."""

    def discard_from(self, step: int) -> int:
        return 0

    def write(self, step: int, metrics, split: str = "train") -> None:
        pass

    def write_table(self, step: int, name: str, columns, rows) -> None:
        pass

    def close(self) -> None:
        pass


class EnvShare:
    """This process's environments of a batch of ``total`` episodes: ``local`` (an ``EnvBatch``)
    holds global episodes ``owned`` (a range), addressed by global index."""

    def __init__(self, local, owned: range, total: int):
        from spear_jax.env_pool import as_batch

        if len(local) != len(owned):
            raise ValueError(f"{len(local)} environments for the {len(owned)} owned episodes {owned}")
        self.local, self.owned, self.total = as_batch(local), owned, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int):
        index = index + self.total if index < 0 else index
        if index not in self.owned:
            raise IndexError(f"episode {index} belongs to another process (this one owns {self.owned})")
        return self.local[index - self.owned.start]

    @property
    def task_ids(self) -> Sequence:
        """The split's task ids (every environment of a split serves the same list)."""
        return self.local[0].task_ids

    def reset_batch(self, requests):
        return self.local.reset_batch([(i - self.owned.start, x) for i, x in requests])

    def step_batch(self, requests):
        return self.local.step_batch([(i - self.owned.start, x) for i, x in requests])

    def close(self) -> None:
        from spear_jax.env_pool import close_envs

        close_envs(self.local)
