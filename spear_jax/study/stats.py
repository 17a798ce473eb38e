"""Statistics of a study: per-run summaries of an eval curve and their spread over seeds.

Per run (one method, one seed), from its held-out success curve ``(steps, success)``:

* ``final``: the success at the last evaluated step;
* ``best``: the largest success over the evaluated steps (the warm start's step-0 evaluation
  included);
* ``auc``: the area under the curve by the trapezoid rule, divided by the step span, i.e. the
  mean success over training:

      auc = sum_i (s_{i+1} - s_i) (y_i + y_{i+1}) / 2  /  (s_last - s_first)

  (a single evaluation: that value).

Over seeds, ``summarize(values)`` gives the mean and a 95% percentile bootstrap interval of the
mean: ``resamples`` draws of n values with replacement from the n seeds' values, the 2.5th and
97.5th percentiles (linear interpolation) of the draws' means. The generator is
``numpy.random.default_rng(BOOTSTRAP_SEED)``, so the interval is the same at every call.
Paired differences ``method - baseline`` are taken seed by seed over the seeds both have, then
summarised the same way.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP_SEED = 20250926
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


def curve_auc(steps: Sequence[int], values: Sequence[float]) -> float:
    """Mean of the piecewise-linear curve through ``(steps, values)`` over its step span."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if steps.shape != values.shape or steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"curve_auc needs two equal-length non-empty 1-d sequences, got shapes "
                         f"{steps.shape} and {values.shape}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"curve_auc needs strictly increasing steps, got {steps.tolist()}")
    if steps.size == 1:
        return float(values[0])
    area = np.sum(np.diff(steps) * (values[1:] + values[:-1]) / 2.0)
    return float(area / (steps[-1] - steps[0]))


def curve_summary(steps: Sequence[int], values: Sequence[float]) -> dict[str, float]:
    """``final``, ``best`` and ``auc`` of one eval curve (module docstring)."""
    if len(steps) == 0:
        raise ValueError("an eval curve without evaluations has no summary")
    return {"final": float(values[-1]), "best": float(max(values)), "auc": curve_auc(steps, values)}


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` [n] (module docstring)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-d sequence, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float]) -> dict:
    """``{"n", "mean", "ci_low", "ci_high"}`` of one quantity over seeds."""
    low, high = bootstrap_interval(values)
    return {"n": len(values), "mean": float(np.mean(values)), "ci_low": low, "ci_high": high}


def paired_differences(method: Mapping[int, float], baseline: Mapping[int, float]) -> dict | None:
    """``method[s] - baseline[s]`` over the seeds ``s`` both have, as ``{"seeds", "values"}``
    plus ``summarize`` of the values; None when they share no seed."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    values = [float(method[s] - baseline[s]) for s in seeds]
    return {"seeds": seeds, "values": values, **summarize(values)}
