"""The Ray backend of ``spear_jax.env_pool``: each worker is a Ray actor owning a ``Shard``.

For hosts with too few CPUs for their environments: the actors run wherever the Ray cluster has
a free CPU (each asks for one). The pool joins the cluster ``ray.init()`` connects to
(``RAY_ADDRESS`` or a local one started on first use); call ``ray.init(address=...)`` before
building the pool to choose another. The worker behaves as the process backend's: a batch is one
actor call, an actor that dies (``RayActorError``) or does not answer by the deadline fails the
requests it holds and is killed, and the pool replaces it at the next reset.
"""
from __future__ import annotations

import time

import ray

from spear_jax.env_pool import EnvFailure, EnvSpec, EnvWorkerError, Shard, registry_entries


class _ShardActor(Shard):
    """A ``Shard`` whose methods Ray calls remotely."""


_RemoteShard = ray.remote(num_cpus=1, max_restarts=0)(_ShardActor)


class RayWorker:
    """One Ray actor and the environments it owns (the members of ``env_pool._Worker``)."""

    def __init__(self, number: int, specs: dict[int, EnvSpec]):
        self.number, self.indices = number, sorted(specs)
        self.failure: str | None = None
        self.actor = _RemoteShard.remote(specs, registry_entries(specs))
        self._pending = self.actor.describe.remote()

    def wait_ready(self) -> dict:
        """The descriptions of the actor's environments, once it has built them."""
        try:
            descriptions = ray.get(self._pending)
        except ray.exceptions.RayError as error:
            raise EnvWorkerError(f"environment worker {self.number} (a Ray actor) failed while building "
                                 f"its environments: {error}") from None
        if isinstance(descriptions, EnvFailure):
            self.stop()
            raise EnvWorkerError(f"environment worker {self.number} could not build its environments: "
                                 f"{descriptions.error}")
        return descriptions

    def send(self, method: str, requests: list) -> None:
        """Starts the actor on a batch (answered by ``receive``)."""
        self._pending = self.actor.call.remote(method, requests)

    def receive(self, deadline: float) -> list | None:
        """The actor's answers, or None (and ``failure`` set) when it dies or passes ``deadline``."""
        ready, _ = ray.wait([self._pending], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            self.fail(f"environment worker {self.number} did not answer within its step timeout")
            return None
        try:
            return ray.get(ready[0])
        except ray.exceptions.RayError as error:
            self.fail(f"environment worker {self.number} died ({type(error).__name__})")
            return None

    def fail(self, reason: str) -> None:
        """Records why the actor is lost and kills it; the pool replaces it at the next reset."""
        self.failure = reason
        self.stop()

    def stop(self) -> None:
        """Closes the actor's environments when it still answers, then ends it."""
        if self.failure is None:
            try:
                ray.get(self.actor.close.remote(), timeout=5.0)
            except ray.exceptions.RayError:
                pass
        ray.kill(self.actor, no_restart=True)
