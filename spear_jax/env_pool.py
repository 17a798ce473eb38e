"""Environment workers: a pool of workers that own the environments and step them in parallel.

The rollout engine steps environments through a batched interface (``EnvBatch``): one
``reset_batch`` per rollout and one ``step_batch`` per turn, each a list of ``(env index,
argument)`` requests whose answers come back in request order, as the call's result or an
``EnvFailure`` holding the error text. Two implementations:

* ``SequentialEnvs``: a list of in-process environments, stepped one after another (the
  default, ``config.env.num_workers <= 1``).
* ``EnvPool``: ``num_workers`` workers, local processes (start method ``"spawn"``: JAX is not
  fork-safe) or, with ``backend="ray"``, Ray actors (``spear_jax.env_pool_ray``).
  Environment ``i`` is built inside worker ``i % num_workers`` from its ``EnvSpec`` (registry
  name and constructor options, seed included), so nothing unpicklable crosses a process
  boundary, and each environment sees the same calls in the same order whatever the worker
  count: results are identical to ``SequentialEnvs`` over the same specs. Workers answer their
  share of a batch concurrently; the pool waits for each at most ``step_timeout_s`` x (its
  requests in the batch). A worker that dies or overruns fails only the requests it holds (and
  its environments' later requests in the same rollout); it is killed and replaced by a fresh
  worker, which rebuilds its environments from their specs, at the next ``reset_batch`` (the
  start of the next rollout). ``close`` ends every worker.

``pool[i]`` is a proxy that satisfies ``environments.base.Env`` (and ``AgentEnv`` when the
environment does), answering ``name``, ``domain``, ``max_steps``, ``prompt_style`` and
``task_ids`` from what the worker reported after building it; its ``reset`` / ``step`` are
one-request batches that raise ``EnvWorkerError`` on failure.

This module imports neither JAX nor Ray, so spawned workers start without them.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Any, Protocol, Sequence

from environments import registry
from environments.base import Env, Observation, StepResult

# The start method of worker processes ("fork" is unsafe once JAX has started threads).
START_METHOD = "spawn"
# Where the workers run: local processes, or Ray actors (``spear_jax.env_pool_ray``).
BACKENDS = ("process", "ray")
# Seconds ``close`` waits for a worker to exit after asking it to, before killing it.
_EXIT_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What builds one environment: ``environments.registry.make_env(name, **kwargs)``."""

    name: str
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class EnvFailure:
    """The answer to a request whose environment raised, or whose worker died or hung."""

    error: str


class EnvWorkerError(RuntimeError):
    """A proxy's ``reset`` / ``step`` failed (the message is the failure's text)."""


class EnvBatch(Protocol):
    """Batched access to ``len(self)`` environments (module docstring)."""

    def __len__(self) -> int:
        ...

    def __getitem__(self, index: int) -> Env:
        ...

    def reset_batch(self, requests: Sequence[tuple[int, Any]]) -> list[Observation | EnvFailure]:
        """``env[i].reset(task_id=t)`` for each ``(i, t)``, answers in request order."""
        ...

    def step_batch(self, requests: Sequence[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        """``env[i].step(text)`` for each ``(i, text)``, answers in request order."""
        ...


def error_text(error: BaseException) -> str:
    """How a failed call is reported: ``"TypeName: message"``."""
    return f"{type(error).__name__}: {error}"


def _call(env: Env, method: str, argument: Any) -> Any:
    """One request on ``env``: the result, or an ``EnvFailure`` when it raises."""
    try:
        if method == "reset":
            return env.reset(task_id=argument)
        return env.step(argument)
    except Exception as error:  # an environment bug fails its episode, not the batch
        return EnvFailure(error_text(error))


class SequentialEnvs:
    """``EnvBatch`` over in-process environments, stepped one after another."""

    def __init__(self, envs: Sequence[Env]):
        self.envs = list(envs)

    def __len__(self) -> int:
        return len(self.envs)

    def __getitem__(self, index: int) -> Env:
        return self.envs[index]

    def reset_batch(self, requests: Sequence[tuple[int, Any]]) -> list[Observation | EnvFailure]:
        return [_call(self.envs[i], "reset", task_id) for i, task_id in requests]

    def step_batch(self, requests: Sequence[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        return [_call(self.envs[i], "step", text) for i, text in requests]


def as_batch(envs: Sequence[Env] | EnvBatch) -> EnvBatch:
    """``envs`` itself when it is batched (an ``EnvPool`` or a view of one), else a
    ``SequentialEnvs`` over the list."""
    if isinstance(envs, (EnvPool, _PoolView, SequentialEnvs)) or hasattr(envs, "reset_batch"):
        return envs
    return SequentialEnvs(envs)


def close_envs(envs: Sequence[Env] | EnvBatch) -> None:
    """Ends an ``EnvPool``'s workers (or a batch's own ``close``), or closes each environment of
    a list."""
    if isinstance(envs, EnvPool) or (hasattr(envs, "reset_batch") and hasattr(envs, "close")):
        envs.close()
    else:
        for env in envs:
            env.close()


# -- the worker process ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Description:
    """What a worker reports about an environment it built (the proxy's static members)."""

    name: str
    env_type: type
    max_steps: int
    task_ids: Sequence[Any]
    prompt_style: Any = None


def _describe(env: Env) -> _Description:
    return _Description(name=env.name, env_type=type(env), max_steps=env.max_steps,
                        task_ids=env.task_ids, prompt_style=getattr(env, "prompt_style", None))


def registry_entries(specs: dict[int, EnvSpec]) -> dict:
    """The registry entries of the environments ``specs`` name (handed to the workers, whose
    registry lacks the environments registered at run time)."""
    return {spec.name: registry.ENVIRONMENTS[spec.name] for spec in specs.values()
            if spec.name in registry.ENVIRONMENTS}


class Shard:
    """The environments of one worker, whatever runs it: built from ``specs`` after
    registering the ``entries`` the registry lacks; a build error is kept, not raised."""

    def __init__(self, specs: dict[int, EnvSpec], entries: dict):
        for name, entry in entries.items():
            registry.ENVIRONMENTS.setdefault(name, entry)
        self.envs: dict[int, Env] = {}
        self.failure: EnvFailure | None = None
        try:
            self.envs = {i: registry.make_env(spec.name, **spec.kwargs) for i, spec in specs.items()}
        except Exception as error:  # reported to the pool, which raises it
            self.failure = EnvFailure(error_text(error))

    def describe(self) -> dict[int, _Description] | EnvFailure:
        """What the pool's proxies answer for each environment, or the build's failure."""
        return self.failure or {i: _describe(env) for i, env in self.envs.items()}

    def call(self, method: str, requests: Sequence[tuple[int, Any]]) -> list:
        """The answers to ``(index, argument)`` requests of ``method`` (``"reset"`` / ``"step"``)."""
        return [_call(self.envs[i], method, argument) for i, argument in requests]

    def close(self) -> None:
        for env in self.envs.values():
            try:
                env.close()
            except Exception:  # closing is best effort on the way out
                pass


def _worker_main(connection, specs: dict[int, EnvSpec], entries: dict) -> None:
    """A worker process's life: build its ``Shard``, report it, then answer batches of
    ``(method, [(index, argument), ...])`` until ``("close", None)`` or the pool goes away."""
    shard = Shard(specs, entries)
    connection.send(shard.describe())
    try:
        while shard.failure is None:
            try:
                method, requests = connection.recv()
            except EOFError:  # the pool's process ended
                break
            if method == "close":
                break
            connection.send(shard.call(method, requests))
    finally:
        shard.close()


# -- the pool -------------------------------------------------------------------------------------

class _Worker:
    """One worker process, its end of the pipe and the environments it owns. The Ray backend's
    worker (``spear_jax.env_pool_ray.RayWorker``) has the same members."""

    def __init__(self, number: int, specs: dict[int, EnvSpec]):
        self.number, self.indices = number, sorted(specs)
        context = multiprocessing.get_context(START_METHOD)
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, specs, registry_entries(specs)),
                                       daemon=True, name=f"env-worker-{number}")
        self.process.start()
        child.close()
        self.failure: str | None = None

    def wait_ready(self) -> dict[int, _Description]:
        """The descriptions the worker sends once its environments are built."""
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise EnvWorkerError(f"environment worker {self.number} exited with code "
                                     f"{self.process.exitcode} while building its environments")
        descriptions = self.connection.recv()
        if isinstance(descriptions, EnvFailure):
            self.process.join()
            raise EnvWorkerError(f"environment worker {self.number} could not build its environments: "
                                 f"{descriptions.error}")
        return descriptions

    def send(self, method: str, requests: list) -> None:
        """Hands the worker a batch (answered by ``receive``); raises ``OSError`` when it is gone."""
        self.connection.send((method, requests))

    def receive(self, deadline: float) -> list | None:
        """The worker's answers, or None (and ``failure`` set) when it dies or passes ``deadline``."""
        try:
            if self.connection.poll(max(0.0, deadline - time.monotonic())):
                return self.connection.recv()
            self.fail(f"environment worker {self.number} did not answer within its step timeout")
        except (EOFError, OSError):
            self.process.join(timeout=1.0)
            self.fail(f"environment worker {self.number} died (exit code {self.process.exitcode})")
        return None

    def fail(self, reason: str) -> None:
        """Records why the worker is lost and kills it; the pool replaces it at the next reset."""
        self.failure = reason
        self.stop()

    def stop(self) -> None:
        """Asks the worker to exit, then kills it if it does not."""
        if self.process.is_alive() and self.failure is None:
            try:
                self.connection.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=_EXIT_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.connection.close()


class EnvPool:
    """``EnvBatch`` over environments owned by ``num_workers`` workers (module docstring).
    Environment ``i`` is ``specs[i]``, in worker ``i % num_workers``; ``backend`` is
    ``"process"`` (local processes) or ``"ray"`` (Ray actors, ``spear_jax.env_pool_ray``)."""

    def __init__(self, specs: Sequence[EnvSpec], num_workers: int, step_timeout_s: float,
                 backend: str = "process"):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"EnvPool num_workers must be a positive int, got {num_workers!r}")
        if not step_timeout_s > 0:
            raise ValueError(f"EnvPool step_timeout_s must be > 0, got {step_timeout_s!r}")
        if backend not in BACKENDS:
            raise ValueError(f"EnvPool backend must be one of {BACKENDS}, got {backend!r}")
        self.specs, self.step_timeout_s = list(specs), float(step_timeout_s)
        self.num_workers = min(num_workers, len(self.specs))
        self._worker_type = _Worker if backend == "process" else _ray_worker_type()
        self._workers = [self._start(w) for w in range(self.num_workers)]
        self._proxies: list[_EnvProxy] = []
        try:
            for worker in self._workers:
                descriptions = worker.wait_ready()
                self._proxies.extend(_EnvProxy(self, i, descriptions[i]) for i in worker.indices)
        except BaseException:  # no worker outlives a pool that could not start
            self.close()
            raise
        self._proxies.sort(key=lambda proxy: proxy.index)

    def _start(self, number: int) -> _Worker:
        specs = {i: self.specs[i] for i in range(number, len(self.specs), self.num_workers)}
        return self._worker_type(number, specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _PoolView(self, range(len(self))[index])
        return self._proxies[index]

    @property
    def processes(self) -> list:
        """The worker processes of the process backend (for monitoring and tests)."""
        return [worker.process for worker in self._workers if isinstance(worker, _Worker)]

    def reset_batch(self, requests: Sequence[tuple[int, Any]]) -> list[Observation | EnvFailure]:
        """Replaces the workers that failed since the last reset, then resets."""
        for number, worker in enumerate(self._workers):
            if worker.failure is not None:
                self._workers[number] = self._start(number)
                self._workers[number].wait_ready()
        return self._dispatch("reset", requests)

    def step_batch(self, requests: Sequence[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        return self._dispatch("step", requests)

    def _dispatch(self, method: str, requests: Sequence[tuple[int, Any]]) -> list:
        """Sends each worker its share of ``requests``, gathers the answers in request order."""
        answers: list = [None] * len(requests)
        shares: dict[int, list[int]] = {}
        for position, (index, _) in enumerate(requests):
            shares.setdefault(index % self.num_workers, []).append(position)
        sent = []
        for number, positions in shares.items():
            worker = self._workers[number]
            if worker.failure is None:
                try:
                    worker.send(method, [requests[p] for p in positions])
                    sent.append((worker, positions, time.monotonic() + self.step_timeout_s * len(positions)))
                    continue
                except (BrokenPipeError, OSError):
                    worker.fail(f"environment worker {number} died (its pipe is closed)")
            for p in positions:
                answers[p] = EnvFailure(f"{worker.failure}; its environments fail until the next rollout")
        for worker, positions, deadline in sent:
            received = worker.receive(deadline)
            for p, answer in zip(positions, received or [EnvFailure(worker.failure)] * len(positions)):
                answers[p] = answer
        return answers

    def close(self) -> None:
        """Ends every worker (they close their environments); the pool is unusable after."""
        for worker in self._workers:
            if worker.failure is None:
                worker.stop()
        self._workers = []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _ray_worker_type() -> type:
    """The Ray backend's worker class; a clear error when Ray is not installed."""
    try:
        from spear_jax.env_pool_ray import RayWorker
    except ImportError as error:
        raise ImportError(f"the ray environment-worker backend needs the ray package ({error}); "
                          "install it (pip install ray) or set config.env.worker_backend='process'") from None
    return RayWorker


class _PoolView:
    """``EnvBatch`` over ``indices`` of a pool (``pool[a:b]``), numbered from 0."""

    def __init__(self, pool: EnvPool, indices: Sequence[int]):
        self.pool, self.indices = pool, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Env:
        return self.pool[self.indices[index]]

    def reset_batch(self, requests: Sequence[tuple[int, Any]]) -> list[Observation | EnvFailure]:
        return self.pool.reset_batch([(self.indices[i], task_id) for i, task_id in requests])

    def step_batch(self, requests: Sequence[tuple[int, str]]) -> list[StepResult | EnvFailure]:
        return self.pool.step_batch([(self.indices[i], text) for i, text in requests])


_PROXY_CLASSES: dict[type, type] = {}


def _proxy_class(env_type: type) -> type:
    """A proxy class per environment class, carrying its ``domain`` class attribute."""
    if env_type not in _PROXY_CLASSES:
        _PROXY_CLASSES[env_type] = type(f"Pooled{env_type.__name__}", (_EnvProxy,),
                                        {"domain": getattr(env_type, "domain", None)})
    return _PROXY_CLASSES[env_type]


class _EnvProxy:
    """Environment ``index`` of a pool, as an ``Env`` (module docstring)."""

    def __new__(cls, pool: EnvPool, index: int, description: _Description):
        return object.__new__(_proxy_class(description.env_type) if cls is _EnvProxy else cls)

    def __init__(self, pool: EnvPool, index: int, description: _Description):
        self.pool, self.index = pool, index
        self.name, self.max_steps = description.name, description.max_steps
        self._task_ids = description.task_ids
        if description.prompt_style is not None:
            self.prompt_style = description.prompt_style

    @property
    def task_ids(self) -> Sequence[Any]:
        return self._task_ids

    def _one(self, answer):
        if isinstance(answer, EnvFailure):
            raise EnvWorkerError(answer.error)
        return answer

    def reset(self, task_id=None, seed=None) -> Observation:
        if seed is not None:
            raise EnvWorkerError("a pooled environment resets by task_id only (draw the task before)")
        return self._one(self.pool.reset_batch([(self.index, task_id)])[0])

    def step(self, response_text: str) -> StepResult:
        return self._one(self.pool.step_batch([(self.index, response_text)])[0])

    def close(self) -> None:
        """The pool owns its environments: ``EnvPool.close`` closes them."""
