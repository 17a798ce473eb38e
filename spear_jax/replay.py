"""SPEAR's replay buffer of good rows, its reward-baseline history and advantage recalibration.

Host-side numpy. A *row batch* is a dict of numpy arrays sharing the leading row axis B:

    scores          [B]    float  shaped row reward R (env/verifier reward + tool-call bonus,
                                  agent: minus the invalid-action penalty)
    row_advantage   [B]    float  scalar advantage the row was trained with (GiGPO: episode+step)
    loss_mask       [B, T] num    response loss mask
    group_id        [B]    int    group (prompt / task) id
    traj_id         [B]    int    trajectory (episode) id
    num_tool_calls  [B]    int    tool calls of the row's trajectory
    ...any other numeric/bool arrays [B, ...] (input_ids, old_logprobs, positions, ...), carried
    along untouched. Their trailing shapes may differ between steps (e.g. T).

Call order the trainer must follow at training step t (t strictly increasing):

    replay, metrics = buffer.replay_if_ready(t, rng, min_rows=num_devices)  # 1. before adding t
    ... on-policy update on batch_t, then SIL update on ``replay`` (if not None) ...
    buffer.remove_old()                                                      # 2. staleness
    buffer.add_step(batch_t, t)                                              # 3. history + admit

So a row collected at step k is replayed at step k+1 at the earliest, and at most once.
``replay_if_ready`` refuses to run when the buffer holds rows from step >= t.

Admission (``add_step``): row kept iff ``advantage > 0`` and its loss mask is non-empty (and,
with ``require_tool_call``, ``num_tool_calls > 0``; math). One entry per step with >= 1 row.
A batch with no rows records nothing (the step still counts as added).

Baseline history (``add_step``, from the full post-filter batch, all groups): per group the mean
and std over trajectories of per-trajectory mean reward (``group_stats``; std ``ddof``
configurable). Before appending step t, the oldest whole steps are evicted while the number of
stored group values exceeds ``baseline_buffer_size`` (so the history may exceed the cap by one
step's groups). Statistics use the flattened history:
``P50_mean = percentile(all group means, 50)`` (linear interpolation; [0, 2.5, 5, 10] -> 3.75),
``P50_std`` likewise over group stds. No per-step lookup is made, so entries whose step has left
the history are handled naturally.

Staleness (``remove_old``): with ``s_latest`` the step of the newest *entry*, drop entries with
``|s_k - s_latest| > tolerate``, ``tolerate = min(tolerate_steps, 10)``.

Trigger: ``valid_count > 1.5 * buffer_size`` (strict). P50 mode: valid rows are those with
``R > P50_mean`` (strict; if the history is empty, ``R > mean R of the row's entry``). Decay mode:
all stored rows.

Recalibration (``replay_if_ready`` when triggered, or ``recalibrated()`` to inspect it without
triggering; ``rows()`` returns the stored rows as they are), over all stored rows:

    P50 mode (w <= 0 or w > 1):  A~ = R - P50_mean                      (norm_adv_by_std False)
                                 A~ = (R - P50_mean) / (P50_std + 1e-6)  (norm_adv_by_std True)
                                 keep rows with A~ >= 0  (rows and rewards filtered together)
    decay mode (0 < w <= 1):     A~ = w * stored advantage, no re-filtering

With GiGPO the recalibrated P50 advantage is episode-level only: it depends on R alone, never on
the stored (episode + step) advantage. Then ``n = min(npo2(#rows), buffer_size)`` rows are drawn
uniformly without replacement (``npo2(x)`` = largest power of two <= x, 0 for x <= 1; n is a
power of two whenever ``buffer_size`` is one, as in every reference script); if
``n < min_rows`` (e.g. the number of devices) the batch is discarded. The buffer is emptied after
every triggered attempt, discarded or not.

Replay batch layout: the rows of all entries concatenated in the drawn (random) order. Arrays
whose trailing shape differs between entries are right-padded with zeros to the per-axis maximum
(mask 0 on padding). ``row_advantage`` holds A~, ``scores`` the stored R, and ``collection_step`` [n]
the step each row was collected at. Stored ``old_logprobs`` etc. are returned as collected.

Memory bound: entries only span steps within the staleness window of the newest entry plus the
step just added, i.e. at most ``min(tolerate_steps, 10) + 2`` entries, so stored rows
<= (tolerate + 2) * (largest batch B); the baseline history holds at most
``baseline_buffer_size + (groups of one step)`` values per statistic. Both are independent of the
run length.

State: ``state_dict()`` returns a flat dict of numpy arrays (rows, history, counters) suitable for
orbax; ``ReplayBuffer.from_state_dict(config, state)`` restores it exactly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from spear_jax.batch_schema import FIELDS, REPLAY_ROW_FIELDS
from spear_jax.filters import largest_power_of_two_at_most
from spear_jax.group_stats import GROUPINGS, group_trajectory_stats, resolve_group_ids

MAX_TOLERATE_STEPS = 10
TRIGGER_FACTOR = 1.5
STD_EPS = 1e-6
REQUIRED_ROW_KEYS = REPLAY_ROW_FIELDS  # the batch schema's names
_FLOAT_KEYS = tuple(key for key in REQUIRED_ROW_KEYS if np.issubdtype(FIELDS[key].dtype, np.floating)
                    and not FIELDS[key].per_token)
_INT_KEYS = tuple(key for key in REQUIRED_ROW_KEYS if np.issubdtype(FIELDS[key].dtype, np.integer))
# Row keys of replay states written before the buffer used the batch schema's names.
_LEGACY_ROW_KEYS = {"advantages": "row_advantage", "group_ids": "group_id", "traj_ids": "traj_id"}
_OUTPUT_KEYS = ("collection_step",)
_STATE_PREFIX_ENTRY = "entry"
_STATE_COUNTERS = ("num_entries", "last_added_step", "num_replays")
_STATE_HISTORY = ("history_steps", "history_counts", "history_means", "history_stds")


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Replay-buffer settings (reference names and defaults in comments).

    Attributes:
      buffer_size: ``trajectory_buffer_size`` (2048); trigger at > 1.5x, cap on replay rows.
      baseline_buffer_size: ``baseline_buffer_size`` (10240) group values kept in the history.
      tolerate_steps: ``trajectory_tolerate_steps`` (10); the effective value is min(x, 10).
      weight_decay: ``weight_decay_trajectory_replay`` (-1): 0 < w <= 1 selects decay mode, else P50.
      norm_adv_by_std: divide the P50 advantage by (P50_std + 1e-6).
      baseline_std_ddof: 0 (agent, population) or 1 (math, unbiased) for group stds.
      require_tool_call: admit only rows whose trajectory made >= 1 tool call (math).
      grouping: "uid" (default) or "positional" (faithful math baseline history; group_size).
    """

    buffer_size: int = 2048
    baseline_buffer_size: int = 10240
    tolerate_steps: int = 10
    weight_decay: float = -1.0
    norm_adv_by_std: bool = False
    baseline_std_ddof: int = 0
    require_tool_call: bool = False
    grouping: str = "uid"
    group_size: int | None = None

    def __post_init__(self):
        for name, minimum in (("buffer_size", 1), ("baseline_buffer_size", 1), ("tolerate_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not np.isfinite(self.weight_decay):
            raise ValueError(
                f"weight_decay must be finite, got {self.weight_decay}"
            )
        if self.baseline_std_ddof not in (0, 1):
            raise ValueError(f"baseline_std_ddof must be 0 or 1, got {self.baseline_std_ddof}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; expected one of {GROUPINGS}")
        if self.grouping == "positional" and (self.group_size is None or self.group_size < 1):
            raise ValueError("grouping='positional' needs group_size >= 1")

    @property
    def mode(self) -> str:
        """"decay" if 0 < w <= 1, else "p50"."""
        return "decay" if 0.0 < self.weight_decay <= 1.0 else "p50"

    @property
    def effective_tolerate_steps(self) -> int:
        return min(int(self.tolerate_steps), MAX_TOLERATE_STEPS)


def nearest_lower_power_of_two(n: int) -> int:
    """Replay subsample size rule: largest power of two <= n, and 0 when n <= 1."""
    return 0 if n <= 1 else largest_power_of_two_at_most(n)


def validate_row_batch(batch: Mapping[str, np.ndarray]) -> int:
    """Checks a row batch (module docstring) and returns its row count B."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of numpy arrays, got {type(batch).__name__}")
    missing = [key for key in REQUIRED_ROW_KEYS if key not in batch]
    if missing:
        raise KeyError(f"batch is missing required row keys {missing}; required: {REQUIRED_ROW_KEYS}")
    reserved = [key for key in _OUTPUT_KEYS if key in batch]
    if reserved:
        raise KeyError(f"batch keys {reserved} are reserved for replay output")
    num_rows = np.shape(batch["scores"])[0] if np.ndim(batch["scores"]) else -1
    for key, value in batch.items():
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"batch[{key!r}] must have a leading row axis, got a scalar")
        if array.shape[0] != num_rows:
            raise ValueError(f"batch[{key!r}] has {array.shape[0]} rows, but batch['scores'] has {num_rows}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"batch[{key!r}] must be numeric or bool, got dtype {array.dtype}")
    for key in _FLOAT_KEYS:
        array = np.asarray(batch[key])
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"batch[{key!r}] must be a 1-D float array [B], got {array.dtype} {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"batch[{key!r}] contains non-finite values")
    for key in _INT_KEYS:
        array = np.asarray(batch[key])
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"batch[{key!r}] must be a 1-D integer array [B], got {array.dtype} {array.shape}"
            )
    mask = np.asarray(batch["loss_mask"])
    if mask.ndim != 2:
        raise ValueError(f"batch['loss_mask'] must be [B, T], got shape {mask.shape}")
    return num_rows


@dataclasses.dataclass
class _Entry:
    step: int
    rows: dict[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        return int(self.rows["scores"].shape[0])


class BaselineHistory:
    """Per-step group means and stds, evicted by whole oldest steps (module docstring)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.steps: list[int] = []
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []

    @property
    def num_values(self) -> int:
        return int(sum(m.shape[0] for m in self.means))

    def append(self, step: int, means: np.ndarray, stds: np.ndarray) -> None:
        while self.steps and self.num_values > self.capacity:
            del self.steps[0], self.means[0], self.stds[0]
        self.steps.append(int(step))
        self.means.append(np.asarray(means, dtype=np.float64))
        self.stds.append(np.asarray(stds, dtype=np.float64))

    def flat_means(self) -> np.ndarray:
        return np.concatenate(self.means) if self.means else np.zeros(0)

    def flat_stds(self) -> np.ndarray:
        return np.concatenate(self.stds) if self.stds else np.zeros(0)

    def statistics(self) -> dict[str, float] | None:
        """P50 / P95 of all stored group means and stds (linear interpolation); None if empty."""
        means, stds = self.flat_means(), self.flat_stds()
        if means.shape[0] == 0:
            return None
        return {
            "p50_mean": float(np.percentile(means, 50)),
            "p95_mean": float(np.percentile(means, 95)),
            "p50_std": float(np.percentile(stds, 50)),
            "p95_std": float(np.percentile(stds, 95)),
        }


def _schema_of(rows: Mapping[str, np.ndarray]) -> dict[str, tuple[np.dtype, int]]:
    return {key: (np.asarray(value).dtype, np.asarray(value).ndim) for key, value in rows.items()}


def _pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == shape:
        return array
    widths = [(0, target - size) for size, target in zip(array.shape, shape)]
    return np.pad(array, widths)


def _concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    trailing = tuple(np.max([p.shape[1:] for p in parts], axis=0)) if parts[0].ndim > 1 else ()
    return np.concatenate([_pad_to(p, (p.shape[0], *trailing)) for p in parts], axis=0)


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """The stored rows as a replay would see them (``ReplayBuffer.recalibrated``).

    Attributes:
      rows: ``ReplayBuffer.rows()``: every stored row array [N, ...] and ``collection_step`` [N].
      advantages: [N] float recalibrated advantages A~ (P50: from R and the baseline history;
        decay: w * stored advantage).
      keep: [N] bool, the rows that pass the sign filter (P50: A~ >= 0; decay: every row).
    """

    rows: dict[str, np.ndarray]
    advantages: np.ndarray
    keep: np.ndarray


class ReplayBuffer:
    """SPEAR's replay buffer (module docstring gives behaviour, call order and bounds)."""

    def __init__(self, config: ReplayConfig):
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        self.config = config
        self._entries: list[_Entry] = []
        self._history = BaselineHistory(config.baseline_buffer_size)
        self._last_added_step: int | None = None
        self._num_replays = 0

    # ------------------------------------------------------------------ inspection

    @property
    def num_rows(self) -> int:
        return sum(entry.num_rows for entry in self._entries)

    @property
    def entry_steps(self) -> list[int]:
        return [entry.step for entry in self._entries]

    @property
    def history(self) -> BaselineHistory:
        return self._history

    def valid_count(self) -> int:
        """Rows counted by the trigger: R > P50_mean (P50 mode) or all rows (decay mode)."""
        if self.config.mode == "decay":
            return self.num_rows
        stats = self._history.statistics()
        count = 0
        for entry in self._entries:
            scores = entry.rows["scores"]
            threshold = stats["p50_mean"] if stats is not None else float(np.mean(scores))
            count += int(np.sum(scores > threshold))
        return count

    def is_full_capacity(self) -> bool:
        """Trigger: valid_count > 1.5 * buffer_size (exactly 1.5x does not fire)."""
        return self.valid_count() > TRIGGER_FACTOR * self.config.buffer_size

    def metrics(self) -> dict[str, float]:
        result = {
            "replay/buffer_rows": float(self.num_rows),
            "replay/buffer_entries": float(len(self._entries)),
            "replay/valid_count": float(self.valid_count()),
            "replay/baseline_values": float(self._history.num_values),
            "replay/num_replays": float(self._num_replays),
        }
        stats = self._history.statistics()
        if stats is not None:
            result.update({f"replay/{key}": value for key, value in stats.items()})
        return result

    # ------------------------------------------------------------------ updates

    def remove_old(self) -> None:
        """Drops entries more than ``min(tolerate_steps, 10)`` steps from the newest entry."""
        if not self._entries:
            return
        latest = self._entries[-1].step
        tolerate = self.config.effective_tolerate_steps
        self._entries = [e for e in self._entries if abs(e.step - latest) <= tolerate]

    def _check_schema(self, batch: Mapping[str, np.ndarray]) -> None:
        """Stored rows are concatenated at replay: keys, dtypes and ranks must match them."""
        if not self._entries:
            return
        schema, stored = _schema_of(batch), _schema_of(self._entries[0].rows)
        if set(schema) != set(stored):
            raise KeyError(f"batch keys {sorted(schema)} differ from the stored row keys {sorted(stored)}")
        bad = [key for key in schema if schema[key] != stored[key]]
        if bad:
            raise TypeError(
                f"batch arrays {bad} have dtype/rank {[schema[k] for k in bad]}, "
                f"stored rows have {[stored[k] for k in bad]}"
            )

    def add_step(self, batch: Mapping[str, np.ndarray], step: int) -> dict[str, float]:
        """Updates the baseline history from the whole batch, then stores its admitted rows.

        Args:
          batch: the post-filter training batch of step ``step`` (module docstring layout).
          step: the training step, strictly greater than the previous ``add_step``'s.
        Returns:
          metrics: rows admitted and the reward-group metrics of the batch.
        """
        validate_row_batch(batch)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an integer, got {step!r}")
        if self._last_added_step is not None and step <= self._last_added_step:
            raise ValueError(
                f"step {step} must be greater than the previous added step {self._last_added_step}"
            )
        self._check_schema(batch)
        self._last_added_step = int(step)
        arrays = {key: np.asarray(value) for key, value in batch.items()}
        if arrays["scores"].shape[0] == 0:  # nothing to record: the history keeps its steps
            return {"replay/rows_admitted": 0.0}
        group_ids = resolve_group_ids(arrays["group_id"], self.config.grouping, self.config.group_size)
        stats = group_trajectory_stats(
            arrays["scores"], group_ids, arrays["traj_id"], ddof=self.config.baseline_std_ddof
        )
        self._history.append(step, stats.means, stats.stds)
        admitted = (arrays["row_advantage"] > 0) & (arrays["loss_mask"].sum(axis=1) > 0)
        if self.config.require_tool_call:
            admitted &= arrays["num_tool_calls"] > 0
        rows = np.flatnonzero(admitted)
        if rows.shape[0]:
            stored = {key: value[rows].copy() for key, value in arrays.items()}
            self._entries.append(_Entry(int(step), stored))
        return {"replay/rows_admitted": float(rows.shape[0])}

    def reset(self) -> None:
        """Empties the stored rows (the baseline history is kept)."""
        self._entries = []

    # ------------------------------------------------------------------ replay

    def rows(self) -> dict[str, np.ndarray]:
        """Every stored row, entries concatenated in storage order (trailing axes zero-padded to
        the longest), with ``collection_step`` [N]; ``{}`` when the buffer is empty. The arrays
        are copies: changing them leaves the buffer as it is."""
        if not self._entries:
            return {}
        rows = {
            key: _concat_padded([entry.rows[key] for entry in self._entries]) for key in self._entries[0].rows
        }
        rows["collection_step"] = np.concatenate(
            [np.full(entry.num_rows, entry.step, dtype=np.int64) for entry in self._entries]
        )
        return rows

    def recalibrated(self) -> Recalibration:
        """The recalibration a trigger would apply now (module docstring), without triggering:
        ``rows()`` with their recalibrated advantages A~ [N] and sign-filter flags ``keep`` [N]
        (the rows a replay draws from). The buffer is not changed. Raises ``RuntimeError`` in P50
        mode while the baseline history is empty (as a trigger would)."""
        rows = self.rows()
        if not rows:
            return Recalibration(rows, np.zeros(0), np.zeros(0, dtype=bool))
        advantages, keep = self._recalibrate(rows)
        return Recalibration(rows, advantages, keep)

    def _recalibrate(self, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(recalibrated advantages [N], bool keep [N]) for the concatenated stored rows."""
        if self.config.mode == "decay":
            advantages = self.config.weight_decay * rows["row_advantage"]
            return advantages, np.ones(advantages.shape[0], dtype=bool)
        stats = self._history.statistics()
        scores = rows["scores"].astype(np.float64)
        if stats is None:
            raise RuntimeError("P50 recalibration needs a non-empty baseline history")
        advantages = scores - stats["p50_mean"]
        if self.config.norm_adv_by_std:
            advantages = advantages / (stats["p50_std"] + STD_EPS)
        return advantages, advantages >= 0

    def replay_if_ready(
        self, step: int, rng: np.random.Generator, min_rows: int = 1
    ) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
        """The replay check of training step ``step`` (call before ``add_step(batch, step)``).

        If triggered: recalibrate, sign-filter, draw ``min(npo2(n), buffer_size)`` rows, discard
        them if fewer than ``min_rows``, and empty the buffer in every case.

        Args:
          step: the current training step; every stored row must be from an earlier step.
          rng: numpy Generator for the subsample (e.g. ``np.random.default_rng([seed, step])``
            so a resumed run draws the same rows).
          min_rows: smallest usable replay batch (the number of data-parallel devices).
        Returns:
          (replay batch or None, metrics).
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        if self._entries and max(self.entry_steps) >= step:
            raise ValueError(
                f"replay_if_ready(step={step}) found rows collected at step {max(self.entry_steps)}: "
                "call it before add_step of the current step"
            )
        metrics = self.metrics()
        metrics.update({key: 0.0 for key in ("replay/triggered", "replay/discarded", "replay/rows",
                                             "replay/candidates", "replay/sign_filtered")})
        if not metrics["replay/valid_count"] > TRIGGER_FACTOR * self.config.buffer_size:
            return None, metrics
        recalibration = self.recalibrated()
        rows, advantages, keep = recalibration.rows, recalibration.advantages, recalibration.keep
        survivors = np.flatnonzero(keep)
        num_draw = min(nearest_lower_power_of_two(survivors.shape[0]), self.config.buffer_size)
        chosen = survivors[rng.permutation(survivors.shape[0])[:num_draw]]
        self.reset()
        self._num_replays += 1
        metrics.update(
            {
                "replay/triggered": 1.0,
                "replay/candidates": float(survivors.shape[0]),
                "replay/sign_filtered": float(keep.shape[0] - survivors.shape[0]),
            }
        )
        if num_draw < min_rows:
            metrics["replay/discarded"] = 1.0
            return None, metrics
        replay = {key: value[chosen] for key, value in rows.items()}
        replay["row_advantage"] = advantages[chosen].astype(rows["row_advantage"].dtype)
        metrics["replay/rows"] = float(num_draw)
        return replay, metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays holding rows, baseline history and counters.

        Contains no zero-size arrays (orbax refuses them): the ``history_*`` keys are present only
        when the history is non-empty, ``entry{i}_*`` keys only for existing entries.
        """
        state = {
            "num_entries": np.asarray(len(self._entries), dtype=np.int64),
            "last_added_step": np.asarray(
                -1 if self._last_added_step is None else self._last_added_step, dtype=np.int64
            ),
            "num_replays": np.asarray(self._num_replays, dtype=np.int64),
        }
        if self._history.steps:
            state["history_steps"] = np.asarray(self._history.steps, dtype=np.int64)
            state["history_counts"] = np.asarray([m.shape[0] for m in self._history.means], dtype=np.int64)
            state["history_means"] = self._history.flat_means().copy()
            state["history_stds"] = self._history.flat_stds().copy()
        for index, entry in enumerate(self._entries):
            state[f"{_STATE_PREFIX_ENTRY}{index}_step"] = np.asarray(entry.step, dtype=np.int64)
            for key, value in entry.rows.items():
                state[f"{_STATE_PREFIX_ENTRY}{index}_row_{key}"] = value.copy()
        return state

    @classmethod
    def from_state_dict(cls, config: ReplayConfig, state: Mapping[str, np.ndarray]) -> "ReplayBuffer":
        """A buffer with ``config`` and the contents of ``state_dict()``."""
        missing = [key for key in _STATE_COUNTERS if key not in state]
        present = [key for key in _STATE_HISTORY if key in state]
        if present and len(present) != len(_STATE_HISTORY):
            missing += [key for key in _STATE_HISTORY if key not in state]
        if missing:
            raise KeyError(f"state is missing keys {missing}")
        buffer = cls(config)
        last = int(state["last_added_step"])
        buffer._last_added_step = None if last < 0 else last
        buffer._num_replays = int(state["num_replays"])
        if present:
            counts = np.asarray(state["history_counts"], dtype=np.int64)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            means, stds = np.asarray(state["history_means"]), np.asarray(state["history_stds"])
            if means.shape[0] != bounds[-1] or stds.shape[0] != bounds[-1]:
                raise ValueError("state history_means/history_stds do not match history_counts")
            for i, hist_step in enumerate(np.asarray(state["history_steps"]).tolist()):
                buffer._history.steps.append(int(hist_step))
                buffer._history.means.append(means[bounds[i]:bounds[i + 1]].astype(np.float64))
                buffer._history.stds.append(stds[bounds[i]:bounds[i + 1]].astype(np.float64))
        for index in range(int(state["num_entries"])):
            step_key = f"{_STATE_PREFIX_ENTRY}{index}_step"
            if step_key not in state:
                raise KeyError(f"state is missing {step_key!r}")
            prefix = f"{_STATE_PREFIX_ENTRY}{index}_row_"
            rows = _current_row_keys(
                {key[len(prefix):]: np.array(value) for key, value in state.items() if key.startswith(prefix)})
            validate_row_batch(rows)
            buffer._check_schema(rows)
            buffer._entries.append(_Entry(int(state[step_key]), rows))
        return buffer


def _current_row_keys(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored rows under the batch schema's names: a state written with the earlier names
    (``advantages``, ``group_ids``, ``traj_ids``) is read as ``row_advantage``, ``group_id``,
    ``traj_id``; a state holding both spellings of one key is refused."""
    both = [old for old, new in _LEGACY_ROW_KEYS.items() if old in rows and new in rows]
    if both:
        raise KeyError(f"replay state rows hold both {both} and their current names "
                       f"{[_LEGACY_ROW_KEYS[k] for k in both]}; the checkpoint is corrupt")
    return {_LEGACY_ROW_KEYS.get(key, key): value for key, value in rows.items()}
