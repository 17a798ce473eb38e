"""Building the trainer's parts from a validated run config: device placement, the frozen KL
reference, the sampler and rollout engines, the environments and the chunked log-prob pass."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from environments.registry import make_env
from spear_jax import distributed, run_config, train_step
from spear_jax.env_pool import EnvPool, EnvSpec
from spear_jax.policy import Policy
from spear_jax.rollout import RolloutEngine, TemplateChatTokenizer
from spear_jax.sampling import Sampler, SamplingParams


def on_mesh(tree, mesh):
    """Every leaf on ``mesh``: sharded leaves keep their layout, the rest (e.g. the optimizer's
    step count) are replicated, so each jitted update sees one device set."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(leaf):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)


def batch_sharding(mesh, leading: int) -> jax.sharding.NamedSharding:
    """Rows split over the batch-parallel mesh axes; ``leading`` unsharded axes come first."""
    spec = jax.sharding.PartitionSpec(*([None] * leading), ("data", "fsdp"))
    return jax.sharding.NamedSharding(mesh, spec)


def reference_params(params, compute_dtype: str):
    """A frozen copy of ``params`` for the KL reference: floating leaves in the compute dtype
    (the model casts every weight to it, so the reference's log-probs are those of ``params``),
    on their own buffers (the policy's are donated to every update) with the same sharding."""
    dtype = jnp.dtype(compute_dtype)

    def copy(leaf):
        return jnp.copy(leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf)

    shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    return jax.jit(lambda tree: jax.tree.map(copy, tree), out_shardings=shardings)(params)


@dataclasses.dataclass
class RolloutParts:
    """The sampler, the train / eval engines and their sampling parameters."""

    sampler: Sampler
    engine: RolloutEngine
    eval_engine: RolloutEngine
    sampling: SamplingParams
    eval_sampling: SamplingParams


def build_rollout(c: ml_collections.ConfigDict, policy: Policy, mesh) -> RolloutParts:
    """One sampler (rows of ``run_config.sequence_length`` tokens) shared by the train engine
    (``group_size`` episodes per task) and the eval engine (one per task)."""
    chat = TemplateChatTokenizer(policy.chat)
    episodes = c.data.train_tasks_per_step * c.data.group_size
    sampler = Sampler(
        policy.graphdef, policy.params, policy.model_config, max_len=run_config.sequence_length(c),
        max_batch=max(episodes, c.data.eval_episodes), cache_dtype=jnp.dtype(c.rollout.kv_cache_dtype),
        weight_dtype=None if c.rollout.weight_dtype == "param" else jnp.dtype(c.rollout.weight_dtype),
        mesh=mesh, max_decode_rows=c.rollout.max_decode_rows, decode_layers=c.rollout.decode_layers)
    return RolloutParts(
        sampler=sampler,
        engine=RolloutEngine(sampler, chat, run_config.rollout_config(c, group_size=c.data.group_size)),
        eval_engine=RolloutEngine(sampler, chat, run_config.rollout_config(c, group_size=1)),
        sampling=run_config.sampling_params(c, chat.assistant_end_ids, evaluation=False),
        eval_sampling=run_config.sampling_params(c, chat.assistant_end_ids, evaluation=True))


def env_specs(c: ml_collections.ConfigDict, split: str, count: int) -> list[EnvSpec]:
    """What builds environment ``i`` of ``count`` on ``split``: seed ``c.seed + i``."""
    kwargs = dict(c.env.kwargs.to_dict(), max_steps=c.env.max_steps)
    return [EnvSpec(c.env.name, dict(kwargs, split=split, seed=c.seed + i)) for i in range(count)]


def make_envs(c: ml_collections.ConfigDict) -> tuple:
    """(this process's training environments of a step, its evaluation environments), each an
    ``distributed.EnvShare`` of the process's block of whole groups (``distributed.owned_range``;
    one process owns them all): in-process environments, or with ``env.num_workers > 1`` an
    ``EnvPool`` of that many workers (processes or Ray actors, ``env.worker_backend``; the same
    environments, built inside the workers)."""
    episodes = c.data.train_tasks_per_step * c.data.group_size
    shares = []
    for split, count, group in (("train", episodes, c.data.group_size), (c.data.eval_split, c.data.eval_episodes, 1)):
        owned = distributed.owned_range(count, group)
        if not owned:
            field = "data.train_tasks_per_step" if split == "train" else "data.eval_episodes"
            raise run_config.ConfigError(
                f"config.{field} gives {count // group} groups for {jax.process_count()} processes: "
                f"process {jax.process_index()} would own none; raise it to at least the process count")
        specs = env_specs(c, split, count)[owned.start:owned.stop]
        if c.env.num_workers > 1:
            local = EnvPool(specs, c.env.num_workers, c.env.step_timeout_s, c.env.worker_backend)
        else:
            local = [make_env(spec.name, **spec.kwargs) for spec in specs]
        shares.append(distributed.EnvShare(local, owned, count))
    return tuple(shares)


class LogProbPass:
    """Token log-probs (and entropies) of a packed batch under given params, one micro-batch of
    rows at a time on the mesh (``prepare.old_logprobs`` takes its bound calls).

    Only the micro-batches holding a real row (one with a valid token) are computed, each
    dispatched before the first result is fetched (the host slices and copies the next while
    the device runs one); a chunk of padding rows alone gets 0 log-probs and entropies. Exact:
    the padding rows come last in a packed batch and carry no loss mask, so nothing downstream
    reads their values. Given the ``selected`` positions (the loss mask), the logits are computed
    there only (at most ``rollout.max_response_length`` per row, the update's bound:
    ``make_token_stats_fn``) and the other positions get 0.
    """

    def __init__(self, graphdef, c: ml_collections.ConfigDict, mesh):
        temperature, chunk = c.rollout.temperature, c.model.logprob_chunk_size
        positions = run_config.logprob_positions(c)
        self._with_entropy = train_step.make_token_stats_fn(graphdef, temperature, chunk, positions=positions)
        self._logprobs = train_step.make_token_stats_fn(graphdef, temperature, chunk, entropy=False,
                                                        positions=positions)
        self.micro = c.actor.ppo_micro_batch_size
        self.sharding = batch_sharding(mesh, leading=0)

    def _chunks(self, fn, params, tokens: np.ndarray, valid: np.ndarray,
                selected: np.ndarray | None) -> list[tuple[int, object]]:
        """(first row, device output) of every micro-batch of rows holding a valid token."""
        real = valid.any(axis=1)

        def rows(array, start):
            return None if array is None else distributed.global_array(array[start:start + self.micro], self.sharding)

        return [(start, fn(params, rows(tokens, start), rows(valid, start), rows(selected, start)))
                for start in range(0, tokens.shape[0], self.micro) if real[start:start + self.micro].any()]

    def _gather(self, chunks, shape) -> np.ndarray:
        """The chunks' [micro, L] outputs in a zero [B, L] float32 array."""
        out = np.zeros(shape, np.float32)
        for start, chunk in chunks:
            out[start:start + self.micro] = distributed.host_values(chunk)
        return out

    def with_entropy(self, params, tokens: np.ndarray, valid: np.ndarray,
                     selected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs [B, L], entropies [B, L]) of ``tokens`` [B, L] under ``params``, at the
        ``selected`` [B, L] positions only when given (0 elsewhere)."""
        chunks = self._chunks(self._with_entropy, params, tokens, valid, selected)
        return (self._gather([(s, out[0]) for s, out in chunks], tokens.shape),
                self._gather([(s, out[1]) for s, out in chunks], tokens.shape))

    def logprobs(self, params, tokens: np.ndarray, valid: np.ndarray,
                 selected: np.ndarray | None = None) -> np.ndarray:
        """Log-probs [B, L] of ``tokens`` under ``params`` (the compiled pass skips the entropy)."""
        return self._gather(self._chunks(self._logprobs, params, tokens, valid, selected), tokens.shape)
