"""Dr.BoT batch filters (host side, numpy): response-quality masks, the low-variance group
filter and the invalid-action penalty.

Response-quality flags (one bool per row):

* overlong:   valid response length >= ``max_response_length``;
* incomplete: agent - no ``<action>...</action>`` after the last ``</think>``; math - the verifier
  found no boxed answer (the caller passes that flag);
* repetitive: some n-gram (n = 20) of response token ids occurs >= 10 times (exactly 9 is not);
* unreadable: the decoded response contains U+FFFD or a common mojibake string.

``mask_low_quality_rows`` zeroes the loss mask of rows whose *enabled* flags are set. Rows are
never deleted, so a masked row keeps its reward and still enters group statistics (advantage
baselines, the group filter, the replay baseline history); it only contributes no loss.

Low-variance group filter (on the shaped rewards before the invalid-action penalty; the quality
masks leave rewards untouched, so it sees the same rewards before or after them):

    per group g: std_g over trajectories of per-trajectory mean reward   (group_stats)
    K = int(ratio * num_groups);  keep the K groups with the largest std ("std") or the
    smallest ("std_rev"); ratio == 1 keeps everything unchanged.

Optional faithful agent behaviour (``truncation="power_of_two"``): after keeping whole groups,
keep a uniformly random subset of 2^floor(log2(n)) of the n kept *rows* (individual steps are
dropped). The default keeps whole groups.

Invalid-action penalty: ``reward_i -= coef * 1[action_i invalid]`` (coef 0.1), applied after the
filters and before advantages, also to GiGPO step rewards.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from environments.react import has_action_after_last_think
from spear_jax.group_stats import GROUPINGS, group_trajectory_stats, resolve_group_ids

QUALITY_FLAGS = ("incomplete", "overlong", "repetitive", "unreadable")
REPETITION_NGRAM = 20
REPETITION_MIN_COUNT = 10
UNREADABLE_MARKERS = ("\ufffd", "ï¿½", "ï¼\ufffd", "ï¼Ÿ", "Ġï¿½")
GROUP_FILTER_TYPES = ("std", "std_rev")
GROUP_FILTER_TRUNCATIONS = ("none", "power_of_two")
INVALID_ACTION_PENALTY = 0.1


def largest_power_of_two_at_most(n: int) -> int:
    """2^floor(log2(n)) for n >= 1, and 0 for n <= 0."""
    return 0 if n <= 0 else 1 << (int(n).bit_length() - 1)


# ----------------------------------------------------------------------------- quality flags


def overlong_flags(response_lengths: np.ndarray, max_response_length: int) -> np.ndarray:
    """[B] bool: valid response length >= ``max_response_length``.

    Args:
      response_lengths: [B] number of valid (non-padding) response tokens per row.
    """
    lengths = np.asarray(response_lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"response_lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    return lengths >= max_response_length


def agent_incomplete_flags(response_texts: Sequence[str]) -> np.ndarray:
    """[B] bool: the response has no ``<action>...</action>`` after its last ``</think>``."""
    return np.array([not has_action_after_last_think(text) for text in response_texts], dtype=bool)


def unreadable_flags(response_texts: Sequence[str]) -> np.ndarray:
    """[B] bool: the decoded text contains U+FFFD or one of ``UNREADABLE_MARKERS``."""
    return np.array(
        [any(marker in text for marker in UNREADABLE_MARKERS) for text in response_texts], dtype=bool
    )


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_HASH_CHUNK_ELEMENTS = 1 << 22


def _max_ngram_count(tokens: np.ndarray, n: int) -> int:
    """Exact: the most frequent n-gram's count, comparing windows as raw bytes."""
    if tokens.shape[0] < n:
        return 0
    windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(tokens, n))
    keys = windows.view(np.dtype((np.void, windows.dtype.itemsize * n))).reshape(-1)
    _, counts = np.unique(keys, return_counts=True)
    return int(counts.max())


def _max_hashed_ngram_counts(ids: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """[B] upper bounds of the most frequent n-gram's count per row.

    Windows are hashed (polynomial, wrapping uint64); equal windows have equal hashes, so the
    largest run of equal sorted hashes is >= the true count. Windows past a row's length get
    distinct values (at worst they collide with real hashes, which only raises the bound).
    """
    num_rows, width = ids.shape
    num_windows = width - n + 1
    tokens = ids.astype(np.uint64)
    hashes = np.zeros((num_rows, num_windows), dtype=np.uint64)
    for k in range(n):
        hashes = hashes * _HASH_MULTIPLIER + tokens[:, k:k + num_windows]
    position = np.arange(num_windows)
    hashes = np.where(position[None, :] + n <= lengths[:, None], hashes,
                      np.uint64(1 << 63) + position.astype(np.uint64)[None, :])
    hashes.sort(axis=1)
    change = np.ones((num_rows, num_windows), dtype=bool)
    change[:, 1:] = hashes[:, 1:] != hashes[:, :-1]
    starts = np.flatnonzero(change.reshape(-1))
    runs = np.diff(np.append(starts, num_rows * num_windows))
    max_runs = np.zeros(num_rows, dtype=np.int64)
    np.maximum.at(max_runs, starts // num_windows, runs)
    return max_runs


def repetitive_flags(
    response_ids: np.ndarray,
    response_lengths: np.ndarray,
    ngram: int = REPETITION_NGRAM,
    min_count: int = REPETITION_MIN_COUNT,
) -> np.ndarray:
    """[B] bool: some ``ngram`` of token ids occurs >= ``min_count`` times (overlaps counted).

    Args:
      response_ids: [B, T] response token ids (right-padded).
      response_lengths: [B] valid tokens per row; only ``response_ids[b, :len_b]`` is examined.

    Exact and vectorised: a rolling hash of all windows (sorted per row) bounds each row's
    largest n-gram count from above; only rows whose bound reaches ``min_count`` are checked
    exactly (``np.unique`` over the raw bytes of their windows).
    """
    ids = np.asarray(response_ids)
    lengths = np.asarray(response_lengths)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"response_ids must be a 2-D integer array [B, T], got {ids.dtype} {ids.shape}")
    if lengths.shape != (ids.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"response_lengths must be an integer array of shape ({ids.shape[0]},), got {lengths.shape}"
        )
    if np.any(lengths < 0) or np.any(lengths > ids.shape[1]):
        raise ValueError(f"response_lengths must lie in [0, {ids.shape[1]}]")
    if ngram < 1 or min_count < 1:
        raise ValueError(f"ngram and min_count must be >= 1, got {ngram}, {min_count}")
    flags = np.zeros(ids.shape[0], dtype=bool)
    # A row needs at least ngram + min_count - 1 tokens to hold min_count n-gram occurrences.
    long_enough = np.flatnonzero(lengths >= ngram + min_count - 1)
    if long_enough.shape[0] == 0:
        return flags
    rows_per_chunk = max(1, _HASH_CHUNK_ELEMENTS // ids.shape[1])
    for start in range(0, long_enough.shape[0], rows_per_chunk):
        chunk = long_enough[start:start + rows_per_chunk]
        bounds = _max_hashed_ngram_counts(ids[chunk], lengths[chunk], ngram)
        for row in chunk[bounds >= min_count]:  # confirm hash candidates exactly
            flags[row] = _max_ngram_count(ids[row, : lengths[row]], ngram) >= min_count
    return flags


@dataclasses.dataclass(frozen=True)
class QualityFlags:
    """Per-row response-quality flags, each [B] bool."""

    incomplete: np.ndarray
    overlong: np.ndarray
    repetitive: np.ndarray
    unreadable: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in QUALITY_FLAGS}


def response_quality_flags(
    response_ids: np.ndarray,
    response_lengths: np.ndarray,
    response_texts: Sequence[str],
    max_response_length: int,
    incomplete: np.ndarray | None = None,
) -> QualityFlags:
    """All four flags for a batch.

    Args:
      response_ids: [B, T] response token ids; response_lengths: [B] valid lengths.
      response_texts: B decoded responses.
      max_response_length: the rollout's response-length limit.
      incomplete: [B] bool from the caller (math: no boxed answer); None computes the agent test.
    """
    num_rows = np.asarray(response_ids).shape[0]
    if len(response_texts) != num_rows:
        raise ValueError(f"response_texts has {len(response_texts)} rows, expected {num_rows}")
    if incomplete is None:
        incomplete = agent_incomplete_flags(response_texts)
    incomplete = np.asarray(incomplete)
    if incomplete.shape != (num_rows,) or incomplete.dtype != bool:
        raise ValueError(
            f"incomplete must be bool of shape ({num_rows},), got {incomplete.dtype} {incomplete.shape}"
        )
    return QualityFlags(
        incomplete=incomplete,
        overlong=overlong_flags(response_lengths, max_response_length),
        repetitive=repetitive_flags(response_ids, response_lengths),
        unreadable=unreadable_flags(response_texts),
    )


def low_quality_rows(flags: QualityFlags, enabled: Iterable[str]) -> tuple[np.ndarray, dict[str, float]]:
    """[B] bool: the rows with any enabled flag set, and the fraction of rows per flag and
    masked in total (``quality/frac_<flag>``, ``quality/frac_masked``)."""
    enabled = tuple(enabled)
    unknown = [name for name in enabled if name not in QUALITY_FLAGS]
    if unknown:
        raise ValueError(f"unknown quality flags {unknown}; expected names from {QUALITY_FLAGS}")
    flag_arrays = flags.as_dict()
    masked = np.zeros(np.shape(flags.overlong)[0], dtype=bool)
    for name in enabled:
        masked |= flag_arrays[name].astype(bool)
    fractions = {**flag_arrays, "masked": masked}
    return masked, {f"quality/frac_{name}": float(np.mean(array)) if masked.shape[0] else 0.0
                    for name, array in fractions.items()}


def mask_low_quality_rows(
    loss_mask: np.ndarray, flags: QualityFlags, enabled: Iterable[str]
) -> tuple[np.ndarray, dict[str, float]]:
    """Zeroes the loss mask of rows with any enabled flag; rewards are untouched.

    Args:
      loss_mask: [B, T] response loss mask.
      flags: per-row flags.
      enabled: names from ``QUALITY_FLAGS`` whose switch is on.

    Returns:
      (new loss mask [B, T] (a copy), metrics: fraction of rows per flag and masked in total).
    """
    mask = np.asarray(loss_mask)
    if mask.ndim != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {mask.shape}")
    flag_arrays = flags.as_dict()
    for name, array in flag_arrays.items():
        if np.shape(array) != (mask.shape[0],):
            raise ValueError(f"flag {name!r} has shape {np.shape(array)}, expected ({mask.shape[0]},)")
    masked, metrics = low_quality_rows(flags, enabled)
    new_mask = np.where(masked[:, None], np.zeros_like(mask), mask)
    return new_mask, metrics


# ----------------------------------------------------------------------------- group filter


@dataclasses.dataclass(frozen=True)
class GroupFilterResult:
    """Rows kept by the group filter.

    Attributes:
      kept_rows: [N] int64 sorted indices into the batch.
      metrics: num_groups, frac_zero_std_groups, groups_kept, rows_kept, truncated (0/1).
    """

    kept_rows: np.ndarray
    metrics: dict[str, float]


def low_variance_group_filter(
    scores: np.ndarray,
    group_ids: np.ndarray,
    traj_ids: np.ndarray | None,
    ratio: float,
    filter_type: str = "std",
    ddof: int = 0,
    truncation: str = "none",
    rng: np.random.Generator | None = None,
    grouping: str = "uid",
    group_size: int | None = None,
) -> GroupFilterResult:
    """Keeps the ``int(ratio * num_groups)`` groups with the most (or least) reward variance.

    Args:
      scores: [B] shaped row rewards (before the invalid-action penalty).
      group_ids: [B] group ids; traj_ids: [B] trajectory ids or None (one row per trajectory).
      ratio: fraction of groups to keep, in (0, 1]; 1 is a no-op.
      filter_type: "std" keeps the largest stds, "std_rev" the smallest. Ties: lower group id first.
      ddof: 0 population std (agent), 1 unbiased (math).
      truncation: "none" (default) or "power_of_two" (reference agent: random 2^k rows of the
        kept rows; needs ``rng``).
      rng: numpy Generator for the truncation.
      grouping: "uid" (by id, default) or "positional" (faithful math ``view(-1, group_size)``).
    """
    _check_group_filter_options(ratio, filter_type, truncation, rng, grouping)
    group_ids = resolve_group_ids(np.asarray(group_ids), grouping, group_size)
    stats = group_trajectory_stats(scores, group_ids, traj_ids, ddof=ddof)
    kept, groups_kept, truncated = _kept_rows(stats, ratio, filter_type, truncation, rng)
    metrics = {
        "group_filter/num_groups": float(stats.num_groups),
        "group_filter/frac_zero_std_groups": float(np.mean(stats.stds == 0.0)) if stats.num_groups else 0.0,
        "group_filter/groups_kept": float(groups_kept),
        "group_filter/rows_kept": float(kept.shape[0]),
        "group_filter/truncated": float(truncated),
    }
    return GroupFilterResult(kept_rows=kept, metrics=metrics)


def _check_group_filter_options(ratio: float, filter_type: str, truncation: str, rng, grouping: str) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    if filter_type not in GROUP_FILTER_TYPES:
        raise ValueError(f"unknown filter_type {filter_type!r}; expected one of {GROUP_FILTER_TYPES}")
    if truncation not in GROUP_FILTER_TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {GROUP_FILTER_TRUNCATIONS}")
    if truncation == "power_of_two" and not isinstance(rng, np.random.Generator):
        raise ValueError("truncation='power_of_two' needs rng=np.random.Generator")
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")


def _kept_rows(stats, ratio: float, filter_type: str, truncation: str,
               rng: np.random.Generator | None) -> tuple[np.ndarray, int, bool]:
    """(kept row indices [K] int64 sorted, groups kept, whether rows were truncated)."""
    num_rows = stats.row_group.shape[0]
    if ratio == 1.0:
        return np.arange(num_rows, dtype=np.int64), stats.num_groups, False
    groups_kept = int(ratio * stats.num_groups)
    order_key = -stats.stds if filter_type == "std" else stats.stds
    chosen = np.argsort(order_key, kind="stable")[:groups_kept]
    keep_group = np.zeros(stats.num_groups, dtype=bool)
    keep_group[chosen] = True
    kept = np.flatnonzero(keep_group[stats.row_group]).astype(np.int64)
    truncated = False
    if truncation == "power_of_two":
        target = largest_power_of_two_at_most(kept.shape[0])
        truncated = target < kept.shape[0]
        kept = np.sort(rng.permutation(kept)[:target])
    return kept, groups_kept, truncated


# ----------------------------------------------------------------------------- invalid actions


def apply_invalid_action_penalty(
    scores: np.ndarray,
    is_action_valid: np.ndarray,
    coef: float = INVALID_ACTION_PENALTY,
    step_rewards: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``scores - coef * invalid`` (and the same for GiGPO step rewards); inputs are not modified.

    Args:
      scores: [B] row rewards; is_action_valid: [B] bool; step_rewards: [B] or None.
    """
    scores = np.asarray(scores)
    valid = np.asarray(is_action_valid)
    if valid.shape != scores.shape or valid.dtype != bool:
        raise ValueError(
            f"is_action_valid must be bool of shape {scores.shape}, got {valid.dtype} {valid.shape}"
        )
    if coef < 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    penalty = coef * (~valid)
    penalised_steps = None
    if step_rewards is not None:
        step_rewards = np.asarray(step_rewards)
        if step_rewards.shape != scores.shape:
            raise ValueError(f"step_rewards must have shape {scores.shape}, got {step_rewards.shape}")
        penalised_steps = step_rewards - penalty
    return scores - penalty, penalised_steps
