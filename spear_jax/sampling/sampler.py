"""Host side of sampling: padding to shape buckets, the ``Sampler`` and multi-turn ``Session``.

Shapes are padded to powers of two so that XLA compiles a handful of programs: the batch to
``batch_bucket(n)`` (at most ``max_batch``), appended tokens to ``length_bucket(L)`` (at least
16), the decode-step buffer to ``length_bucket(max_new_tokens)``, a fresh cache to
``min(max_len, prompt bucket + step bucket)`` slots, the eos / stop tables to powers of two.
A call works on the cache prefix of ``attention_window`` slots (the power-of-two bucket of the
most any active row will hold after the call, at most the cache length), so a session's decode
cost follows its filled context, not ``max_len``.
Sampling values (temperature, top-k, top-p, greedy, ids of eos / stop tokens) and the weights
are traced arguments: changing them never recompiles.

A row may generate at most ``min(max_new_tokens, max_len - tokens already held)`` tokens (and,
in a session, at most its own ``row_limits`` entry when one is given); a row that reaches its
limit finishes with "length".
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from spear_jax.distributed import host_values
from spear_jax.model import KVCache, ModelConfig, init_cache, lora
from spear_jax.sampling import decode
from spear_jax.sampling.decode_step import decode_weights
from spear_jax.sampling.distribution import SamplingKnobs
from spear_jax.sampling.params import Generation, SamplingParams
from spear_jax.sampling.stops import StopTable
from spear_jax.sharding import logical_to_pspec, shard_state

MIN_LENGTH_BUCKET = 16


def length_bucket(n: int) -> int:
    """Smallest power of two >= max(n, MIN_LENGTH_BUCKET)."""
    return 1 << (max(n, MIN_LENGTH_BUCKET) - 1).bit_length()


def attention_window(cache_len: int, held: np.ndarray, appended: np.ndarray, budget: np.ndarray,
                     active: np.ndarray) -> int:
    """Cache slots a call works on: min(cache_len, length_bucket(max over active rows of
    held + appended + budget)). held, appended, budget: [B] int; active: [B] bool (some True)."""
    need = int(np.max(np.where(active, held + appended + budget, 0)))
    return min(cache_len, length_bucket(need))


def _check_sampling(sampling, vocab_size: int) -> None:
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    sampling.check_vocab(vocab_size)


def _as_token_row(row, name: str, vocab_size: int) -> np.ndarray:
    arr = np.asarray(row)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int32)


class Sampler:
    """KV-cache sampler over a split NNX model (``graphdef``, ``state``).

    max_len: cache slots per row (prompt + all turns + generations); max_batch: most rows per
    call; cache_dtype: KV storage dtype (bfloat16 halves cache memory); weight_dtype: None to
    decode with the weights as given, or a float dtype to keep a copy of the floating-point
    weights in it (every decode step reads all weights, so bfloat16 halves the bytes per step
    of float32 master weights; under ``config.compute_dtype`` bfloat16 the model casts every
    weight to bfloat16 anyway, so results agree up to XLA's fusion rounding, bit for bit on
    CPU); mesh: a ``spear_jax.sharding.make_mesh`` mesh to shard weights (by
    ``config.sharding_rules``), the batch and the cache over, or None for one device;
    max_decode_rows: most rows one decode program holds (0 = all rows of a call at once): a call
    with more rows decodes them in consecutive chunks of at most that many (a session keeps one
    cache per chunk), each chunk on its own cache, so the KV cache and the activations of a
    program scale with the chunk, not the call. Row b always draws with fold_in(key, b), so
    chunked and unchunked calls give the same generations.
    decode_layers: "auto", "unrolled" or "scanned" (``decode.decode_step_form``, resolved into
    ``decode_form``): "unrolled" decodes a scanned deep model with the per-layer step unrolled
    (fastest per token, compile time growing with the depth; "auto"'s choice on CPU), "scanned"
    with the step's layer scan (compile time independent of the depth); both need whole layers
    on every device (no mesh axis but ``data`` above 1).
    Where the per-layer step runs (``decode_form`` not None), ``set_params`` also keeps the
    output-major copy of the block weights it reads (``decode_step.decode_weights``, one jitted
    call per update): the sampler then holds one more copy of the layer weights.
    A LoRA state (``config.lora_rank > 0``) is decoded merged: ``set_params`` folds the adapters
    into the weights (``spear_jax.model.lora.merge_lora``, one jitted call per update) and the
    decode runs the base architecture, at the base model's cost per token.
    """

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, config: ModelConfig, *,
                 max_len: int, max_batch: int, cache_dtype=jnp.float32, weight_dtype=None, mesh=None,
                 max_decode_rows: int = 0, decode_layers: str = "auto"):
        if not 1 <= max_len <= config.max_position_embeddings:
            raise ValueError(
                f"max_len must be in [1, config.max_position_embeddings={config.max_position_embeddings}], "
                f"got {max_len}"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_decode_rows < 0:
            raise ValueError(f"max_decode_rows must be >= 0 (0 = all rows in one program), got {max_decode_rows}")
        if decode_layers != "auto" and not decode.whole_layers_per_device(None if mesh is None else mesh.shape):
            raise ValueError(f"decode_layers={decode_layers!r} needs whole layers on every device, but the mesh "
                             f"{dict(mesh.shape)} shards them: use decode_layers='auto'")
        if not jnp.issubdtype(jnp.dtype(cache_dtype), jnp.floating):
            raise ValueError(f"cache_dtype must be a float dtype, got {cache_dtype}")
        if weight_dtype is not None and not jnp.issubdtype(jnp.dtype(weight_dtype), jnp.floating):
            raise ValueError(f"weight_dtype must be None or a float dtype, got {weight_dtype}")
        self.graphdef, self.config = graphdef, config
        self._merge = None
        if config.lora_rank > 0:
            self.graphdef = lora.base_graphdef(config)
            self._merge = jax.jit(functools.partial(lora.merge_lora, cfg=config))
        self.max_len, self.max_batch = max_len, max_batch
        self.chunk_rows = min(max_batch, max_decode_rows) if max_decode_rows else max_batch
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.weight_dtype = None if weight_dtype is None else jnp.dtype(weight_dtype)
        self.mesh = mesh
        self.decode_form = decode.decode_step_form(config, mesh, decode_layers)  # checks the name
        self._signature = _state_signature(state)
        self._state = None
        self._cache_makers = {}  # (batch, length) -> jitted sharded constructor
        self.set_params(state)

    # -- weights -----------------------------------------------------------------------------
    def set_params(self, state: nnx.State) -> None:
        """Use new weights from now on (same structure, shapes and dtypes: no recompilation);
        LoRA adapters merged into their weights, cast to ``weight_dtype`` if one was given."""
        signature = _state_signature(state)
        if signature != self._signature:
            diff = [f"{a} vs {b}" for a, b in zip(self._signature[1], signature[1]) if a != b][:3]
            raise ValueError(
                "state does not match the sampler's weights (structure, shapes or dtypes differ); "
                f"first differences (expected vs got): {diff or 'tree structure'}"
            )
        if self._merge is not None:
            state = self._merge(state)
        if self.mesh is not None:
            state = shard_state(state, self.config.sharding_rules, self.mesh)
        if self.weight_dtype is not None:
            state = jax.tree.map(self._cast_weight, state)
        self._state = state
        self._decode_weights = None  # the old copy goes before the new one is made
        if self.decode_form is not None:
            with self._on_mesh():
                self._decode_weights = decode_weights(self.graphdef, state, self.decode_form == "scanned")

    def _on_mesh(self):
        """The context that traces and runs this sampler's programs on its mesh (none without)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _cast_weight(self, x: jax.Array) -> jax.Array:
        return x.astype(self.weight_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    # -- shapes ------------------------------------------------------------------------------
    def batch_bucket(self, n: int) -> int:
        """Padded batch of one program for n rows (n <= chunk_rows): a power of two (at least the
        mesh's data x fsdp size), at most chunk_rows."""
        if not 1 <= n <= self.chunk_rows:
            raise ValueError(f"number of rows must be in [1, {self.chunk_rows}] (max_batch={self.max_batch}, "
                             f"chunks of max_decode_rows), got {n}")
        data_parallel = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return min(1 << (max(n, data_parallel) - 1).bit_length(), self.chunk_rows)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(first row, number of rows) of the consecutive chunks that decode n rows (n <= max_batch)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"number of rows must be in [1, max_batch={self.max_batch}], got {n}")
        return [(start, min(self.chunk_rows, n - start)) for start in range(0, n, self.chunk_rows)]

    def new_cache(self, batch: int, length: int) -> KVCache:
        """Empty cache ([layers, batch, length, kv_heads, head_dim]), laid out on the mesh."""
        if self.mesh is None:
            return init_cache(self.config, batch, length, self.cache_dtype)
        shape = (self.config.num_layers, batch, length, self.config.num_kv_heads, self.config.head_dim)
        if (batch, length) not in self._cache_makers:
            rules = self.config.sharding_rules
            kv = NamedSharding(self.mesh, logical_to_pspec(decode.CACHE_AXES, shape, rules, self.mesh))
            lengths = NamedSharding(self.mesh, logical_to_pspec(("act_batch",), (batch,), rules, self.mesh))
            self._cache_makers[batch, length] = jax.jit(
                lambda: init_cache(self.config, batch, length, self.cache_dtype),
                out_shardings=KVCache(k=kv, v=kv, lengths=lengths))
        return self._cache_makers[batch, length]()

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 key: jax.Array) -> list[Generation]:
        """Independent prompts (any lengths) on a fresh cache per chunk of rows; one Generation
        per prompt."""
        _check_sampling(sampling, self.config.vocab_size)
        rows = [_as_token_row(p, f"prompts[{b}]", self.config.vocab_size) for b, p in enumerate(prompts)]
        if not rows:
            raise ValueError("prompts is empty")
        longest = max(len(r) for r in rows)
        if longest > self.max_len:
            raise ValueError(f"a prompt has {longest} tokens, more than max_len={self.max_len}")
        cache_len = min(self.max_len, length_bucket(longest) + length_bucket(sampling.max_new_tokens))
        results = []
        for first, count in self.chunks(len(rows)):
            batch = self.batch_bucket(count)
            padded = rows[first:first + count] + [None] * (batch - count)
            held = np.zeros((batch,), np.int64)
            chunk, _ = self.run(self.new_cache(batch, cache_len), padded, held, sampling, key, first_row=first)
            results += chunk[:count]
        return results

    def start_session(self, batch_size: int) -> "Session":
        """A multi-turn session of ``batch_size`` rows sharing one persistent cache."""
        return Session(self, batch_size)

    def run(self, cache: KVCache, rows: list[np.ndarray | None], held: np.ndarray,
            sampling: SamplingParams, key: jax.Array,
            row_limits: np.ndarray | None = None, first_row: int = 0) -> tuple[list[Generation | None], KVCache]:
        """Append rows[b] (None = inactive) to a cache whose row b holds held[b] tokens, decode,
        return the generations and the new cache (the input cache is donated). ``row_limits``
        [batch] int (optional) caps each row's new tokens below ``sampling.max_new_tokens``;
        ``first_row``: the index of rows[0] among the call's rows (its draws use
        fold_in(key, first_row + b))."""
        _check_sampling(sampling, self.config.vocab_size)
        batch, cache_len = cache.batch_size, cache.max_len
        width = length_bucket(max(len(r) for r in rows if r is not None))
        tokens = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        budget = np.zeros((batch,), np.int32)
        appended = np.zeros((batch,), np.int64)
        for b, row in enumerate(rows):
            if row is not None:
                tokens[b, : len(row)], valid[b, : len(row)] = row, True
                appended[b] = len(row)
                budget[b] = min(sampling.max_new_tokens, cache_len - held[b] - len(row))
                if row_limits is not None:
                    budget[b] = min(budget[b], row_limits[b])
        window = attention_window(cache_len, held, appended, budget, appended > 0)
        knobs = SamplingKnobs.make(sampling.temperature, sampling.top_p, sampling.top_k, sampling.greedy)
        table = StopTable.make(sampling.eos_ids, sampling.stop_sequences)
        with self._on_mesh():
            out_tokens, out_logprobs, num, finish, cache = decode.extend_and_decode(
                self.graphdef, self._state, cache, jnp.asarray(tokens), jnp.asarray(valid),
                jnp.asarray(budget), knobs, table, key, jnp.int32(first_row), self._decode_weights,
                max_steps=length_bucket(sampling.max_new_tokens), window=window, rules=self.config.sharding_rules,
            )
        out_tokens, out_logprobs, num, finish = host_values((out_tokens, out_logprobs, num, finish))
        results: list[Generation | None] = []
        for b, row in enumerate(rows):
            if row is None:
                results.append(None)
                continue
            n = int(num[b])
            results.append(Generation(tokens=out_tokens[b, :n].copy(), logprobs=out_logprobs[b, :n].copy(),
                                      finish_reason=decode.FINISH_CODES[int(finish[b])]))
        return results, cache


class Session:
    """Multi-turn rows sharing a persistent KV cache (trajectory rows).

    Each call appends new tokens after everything a row already holds (its earlier prompts,
    observations and generated tokens) and decodes; earlier turns are never re-prefilled. The
    rows are split into the sampler's chunks (``Sampler.chunks``), one persistent cache each;
    a call decodes the chunks with an active row one after the other.
    """

    def __init__(self, sampler: Sampler, batch_size: int):
        self._sampler = sampler
        self.batch_size = batch_size
        self._chunks = sampler.chunks(batch_size)
        self._caches = [sampler.new_cache(sampler.batch_bucket(count), sampler.max_len)
                        for _, count in self._chunks]
        self._held = np.zeros((batch_size,), np.int64)

    def extend_and_generate(self, new_tokens: Sequence[Sequence[int] | None], sampling: SamplingParams,
                            key: jax.Array, max_new_tokens: Sequence[int] | None = None) -> list[Generation | None]:
        """Row b: append new_tokens[b] (prompt first, observations later), then decode at most
        ``min(sampling.max_new_tokens, max_new_tokens[b])`` tokens (``max_new_tokens`` optional,
        each entry >= 1). None = inactive this turn (nothing appended or generated, result None)."""
        if len(new_tokens) != self.batch_size:
            raise ValueError(f"new_tokens has {len(new_tokens)} rows, the session has {self.batch_size}")
        limits = None
        if max_new_tokens is not None:
            limits = np.asarray(max_new_tokens, np.int64)
            if limits.shape != (self.batch_size,) or (limits < 1).any():
                raise ValueError(f"max_new_tokens must hold {self.batch_size} entries >= 1, got {limits.tolist()}")
        vocab, max_len = self._sampler.config.vocab_size, self._sampler.max_len
        _check_sampling(sampling, vocab)
        rows = [None if t is None else _as_token_row(t, f"new_tokens[{b}]", vocab)
                for b, t in enumerate(new_tokens)]
        for b, row in enumerate(rows):
            if row is not None and self._held[b] + len(row) > max_len:
                raise ValueError(
                    f"new_tokens[{b}] ({len(row)} tokens) does not fit: row {b} holds "
                    f"{self._held[b]} of max_len={max_len} tokens"
                )
        results: list[Generation | None] = []
        for index, (first, count) in enumerate(self._chunks):
            part = slice(first, first + count)
            results += self._run_chunk(index, rows[part], None if limits is None else limits[part], sampling, key)
        for b, (row, gen) in enumerate(zip(rows, results)):
            if row is not None:
                self._held[b] += len(row) + len(gen.tokens)
        return results

    def _run_chunk(self, index: int, rows: list[np.ndarray | None], limits: np.ndarray | None,
                   sampling: SamplingParams, key: jax.Array) -> list[Generation | None]:
        """Decode chunk ``index`` (its rows, None = inactive; limits [rows] or None) on its cache."""
        if all(row is None for row in rows):
            return [None] * len(rows)
        first, count = self._chunks[index]
        padding = self._caches[index].batch_size - count
        held = np.concatenate([self._held[first:first + count], np.zeros(padding, np.int64)])
        if limits is not None:
            limits = np.concatenate([limits, np.ones(padding, np.int64)])
        results, self._caches[index] = self._sampler.run(
            self._caches[index], rows + [None] * padding, held, sampling, key, limits, first_row=first)
        return results[:count]

    def lengths(self) -> np.ndarray:
        """[batch_size] int: tokens held per row."""
        return self._held.copy()

    def device_lengths(self) -> np.ndarray:
        """[batch_size] int: the caches' own row lengths (equal to ``lengths()``)."""
        return np.concatenate([np.asarray(jax.device_get(cache.lengths))[:count]
                               for cache, (_, count) in zip(self._caches, self._chunks)])


def _state_signature(state: nnx.State):
    leaves, treedef = jax.tree.flatten(state)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
