"""A study's results folder: compact metrics, ``results.json``, ``results.md`` and figures.

``results/<study>/`` is self-contained:

* ``study.json``: the study config (methods, seeds, baseline, budget, overrides);
* ``metrics/<method>/seed<k>.jsonl``: of each finished run, the records of ``metrics.jsonl``
  cut to ``COMPACT_KEYS`` (the curves the report draws), one line per (split, step);
* ``warm_start_data/seed<k>.json``: the stats of each seed's recorded warm-start data;
* ``results.json``, ``results.md``, ``figures/*.png``: written by ``write_report`` from the two
  above only, so ``python -m spear_jax.study --report results/<study>`` rewrites them byte for
  byte (the bootstrap has a fixed seed: ``stats``).

``results.json`` is ``{"study", "title", "seeds", "baseline", "budget", "methods": {<method>:
{"label", "config", "overrides", "seeds": [{"seed", "final", "best", "auc", "eval_steps",
"eval_success"}, ...], "final" | "best" | "auc": {"n", "mean", "ci_low", "ci_high"},
"vs_baseline": {"final" | "best" | "auc": {"seeds", "values", "n", "mean", "ci_low",
"ci_high"}}, "base", "vs_base"}}}`` (``vs_baseline`` absent for the baseline; ``base`` and
``vs_base``, the same differences against the method's own base, only for a method the study
gives one; a method without finished runs has no summaries).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np

from spear_jax.metrics import curves, markdown_table, read_metrics
from spear_jax.study import stats

EVAL_SUCCESS = ("eval", "success_rate")
# (split, key, title) of each figure: the mean over seeds with a 95% bootstrap band.
FIGURES = (
    ("eval", "success_rate", "held-out success rate"),
    ("train", "success_rate", "train success rate"),
    ("train", "episode_return", "train episode return"),
    ("train", "actor/entropy", "policy entropy"),
    ("train", "episode_length", "episode length (env steps)"),
    ("train", "tool_calls", "tool calls per episode"),
    ("train", "actor/pg_clipfrac", "PPO clip fraction (upper)"),
    ("train", "actor/pg_clipfrac_lower", "PPO clip fraction (lower)"),
    ("train", "actor/cov_selected_fraction", "Clip-Cov selected token fraction"),
    ("train", "replay/sil_weight", "SIL weight"),
    ("train", "replay/buffer_rows", "replay buffer rows"),
    ("train", "replay/triggered", "replay triggered"),
    ("train", "reward/toolcall_factor", "tool-call reward factor"),
)
# The figures' keys plus what diagnoses the replay (rows replayed, the P50 baseline, rows dropped
# by recalibration) and the update (PPO KL, the lower clip fraction's partner).
COMPACT_KEYS = {
    "eval": ("success_rate", "episode_return", "episode_length", "tool_calls"),
    "train": tuple(key for split, key, _ in FIGURES if split == "train") + (
        "replay/num_replays", "replay/rows", "replay/p50_mean", "replay/candidates", "replay/sign_filtered",
        "actor/ppo_kl", "actor/cov_num_selected"),
}
SUMMARIES = ("final", "best", "auc")


def compact_records(records: Sequence[dict]) -> list[dict]:
    """One record per (split, step) of ``COMPACT_KEYS`` (a rewritten step: its last record),
    eval before train, by step; keys without a finite value are left out."""
    out = []
    for split, keys in COMPACT_KEYS.items():
        by_step: dict[int, dict] = {}
        for key in keys:
            for step, value in zip(*curves(records, key, split)):
                by_step.setdefault(step, {"split": split, "step": step})[key] = value
        out += [by_step[step] for step in sorted(by_step)]
    return out


def compact_path(results_dir: str, method: str, seed: int) -> str:
    return os.path.join(results_dir, "metrics", method, f"seed{seed}.jsonl")


def write_compact(run_workdir: str, path: str) -> None:
    """``path``: the compact records of the run in ``run_workdir``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in compact_records(read_metrics(run_workdir)):
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def write_study_json(results_dir: str, study_dict: dict) -> None:
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "study.json"), "w", encoding="utf-8") as handle:
        json.dump(study_dict, handle, indent=2, sort_keys=True)
        handle.write("\n")


def copy_warm_start_stats(workdir: str, results_dir: str, seeds: Sequence[int]) -> None:
    """The stats files of the recorded warm-start data (``warm_data``), where they exist."""
    for seed in seeds:
        source = os.path.join(workdir, "warm_start_data", f"seed{seed}.json")
        if os.path.isfile(source):
            os.makedirs(os.path.join(results_dir, "warm_start_data"), exist_ok=True)
            shutil.copyfile(source, os.path.join(results_dir, "warm_start_data", f"seed{seed}.json"))


def load_study(results_dir: str) -> dict:
    """The results folder's ``study.json``."""
    path = os.path.join(results_dir, "study.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a results folder written by python -m spear_jax.study)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_records(results_dir: str) -> dict[str, dict[int, list[dict]]]:
    """{method name: {seed: compact records}} of every run in the results folder, in the study's
    method order (a method without runs maps to ``{}``)."""
    study = load_study(results_dir)
    return {m["name"]: _seed_records(results_dir, m["name"], study["seeds"]) for m in study["methods"]}


def _seed_records(results_dir: str, method: str, seeds: Sequence[int]) -> dict[int, list[dict]]:
    """{seed: compact records} of the method's runs present in the results folder."""
    found = {}
    for seed in seeds:
        path = compact_path(results_dir, method, seed)
        if os.path.isfile(path):
            found[seed] = read_metrics(path)
    return found


def method_results(study: dict, method: dict, results_dir: str) -> dict:
    """The ``results.json`` entry of one method, without its comparison with the baseline."""
    entry = {"label": method["label"], "config": method["config"], "overrides": method["overrides"], "seeds": []}
    for seed, records in sorted(_seed_records(results_dir, method["name"], study["seeds"]).items()):
        steps, success = curves(records, EVAL_SUCCESS[1], EVAL_SUCCESS[0])
        if not steps:
            raise ValueError(f"{compact_path(results_dir, method['name'], seed)}: no eval success_rate records")
        entry["seeds"].append({"seed": seed, **stats.curve_summary(steps, success),
                               "eval_steps": steps, "eval_success": success})
    if entry["seeds"]:
        for name in SUMMARIES:
            entry[name] = stats.summarize([record[name] for record in entry["seeds"]])
    return entry


def paired_summaries(entry: dict, other: dict) -> dict:
    """{summary: paired differences entry - other over their common seeds} (``stats``)."""
    comparison = {}
    for summary in SUMMARIES:
        paired = stats.paired_differences({r["seed"]: r[summary] for r in entry["seeds"]},
                                          {r["seed"]: r[summary] for r in other["seeds"]})
        if paired is not None:
            comparison[summary] = paired
    return comparison


def study_results(results_dir: str) -> dict:
    """``results.json``'s content from ``study.json`` and the compact metrics."""
    study = load_study(results_dir)
    methods = {m["name"]: method_results(study, m, results_dir) for m in study["methods"]}
    for name, entry in methods.items():
        if name != study["baseline"]:
            entry["vs_baseline"] = paired_summaries(entry, methods[study["baseline"]])
    for m in study["methods"]:
        if m.get("base"):
            methods[m["name"]]["base"] = m["base"]
            methods[m["name"]]["vs_base"] = paired_summaries(methods[m["name"]], methods[m["base"]])
    return {"study": study["name"], "title": study["title"], "seeds": study["seeds"], "baseline": study["baseline"],
            "budget": study["budget"], "methods": methods}


def _interval(summary: dict | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"


def _signed_interval(summary: dict | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:+.3f} [{summary['ci_low']:+.3f}, {summary['ci_high']:+.3f}]"


def markdown(results: dict, figures: Sequence[tuple[str, str]]) -> str:
    """``results.md``: the study, the success table, the paired differences, per-seed values,
    the figures and the runs not (yet) in the results."""
    methods, budget = results["methods"], results["budget"]
    base_label = methods[results["baseline"]]["label"]
    lines = [f"# {results['title']}", "",
             f"Study `{results['study']}`: {len(methods)} methods x seeds {results['seeds']}; every run "
             f"{budget['total_steps']} RL steps from its seed's shared warm start, held-out evaluation on "
             f"{budget['eval_episodes']} episodes every {budget['eval_every']} steps (step 0: the warm start). "
             f"Mean over seeds with a 95% bootstrap interval ({stats.BOOTSTRAP_RESAMPLES} resamples). "
             f"AUC: the mean held-out success over training (trapezoid rule over the evaluated steps).",
             "", f"Regenerate: `python -m spear_jax.study --report results/{results['study']}`.", "",
             "## Held-out success", ""]
    rows = [[m["label"], len(m["seeds"]), *(_interval(m.get(s)) for s in SUMMARIES)] for m in methods.values()]
    lines += [markdown_table(["method", "seeds", "final", "best", "AUC"], rows), "",
              f"## Paired differences against {base_label} (same seeds)", ""]
    rows = [[m["label"], len(m["vs_baseline"].get("final", {}).get("seeds", [])),
             *(_signed_interval(m["vs_baseline"].get(s)) for s in SUMMARIES)]
            for name, m in methods.items() if name != results["baseline"]]
    lines += [markdown_table(["method", "paired seeds", "Δ final", "Δ best", "Δ AUC"], rows), ""]
    based = [m for m in methods.values() if m.get("base")]
    if based:
        lines += ["## Paired differences against each method's base (same seeds)", ""]
        rows = [[m["label"], methods[m["base"]]["label"], len(m["vs_base"].get("final", {}).get("seeds", [])),
                 *(_signed_interval(m["vs_base"].get(s)) for s in SUMMARIES)] for m in based]
        lines += [markdown_table(["method", "base", "paired seeds", "Δ final", "Δ best", "Δ AUC"], rows), ""]
    lines += ["## Per seed", ""]
    rows = [[m["label"], r["seed"], *(f"{r[s]:.3f}" for s in SUMMARIES)] for m in methods.values() for r in m["seeds"]]
    lines += [markdown_table(["method", "seed", "final", "best", "AUC"], rows), "", "## Figures", ""]
    lines += [f"![{title}]({path})" for path, title in figures]
    missing = [f"{m['label']} seed {seed}" for m in methods.values()
               for seed in results["seeds"] if seed not in {r["seed"] for r in m["seeds"]}]
    if missing:
        lines += ["", "## Runs not in these results", "", ", ".join(missing)]
    return "\n".join(lines) + "\n"


def headline_table(results: dict) -> str:
    """The study's headline table: per method, its seeds, final held-out success and AUC (mean
    [95% interval]) and its paired difference in final success from the baseline."""
    base = results["baseline"]
    rows = [[m["label"], len(m["seeds"]), _interval(m.get("final")), _interval(m.get("auc")),
             "(baseline)" if name == base else _signed_interval(m["vs_baseline"].get("final"))]
            for name, m in results["methods"].items()]
    return markdown_table(["method", "seeds", "final held-out success", "AUC",
                           f"Δ final vs {results['methods'][base]['label']}"], rows)


def marked_block(study: str) -> tuple[str, str]:
    """The comments that enclose a study's headline table in a markdown file."""
    return f"<!-- results:{study} -->", f"<!-- /results:{study} -->"


def update_marked_blocks(path: str, results: dict) -> bool:
    """Rewrites the text between ``marked_block(study)`` in ``path`` with the headline table;
    returns whether the file has such a block."""
    start, end = marked_block(results["study"])
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{head}{start}\n{headline_table(results)}\n{end}{tail}")
    return True


def band_curve(per_seed: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(steps every seed has, mean [S], ci_low [S], ci_high [S]) of one metric over seeds."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in per_seed)))
    columns = [[dict(zip(steps, values))[s] for steps, values in per_seed] for s in common]
    intervals = np.array([stats.bootstrap_interval(c) for c in columns]).reshape(-1, 2)
    return common, np.array([np.mean(c) for c in columns]), intervals[:, 0], intervals[:, 1]


def _figure(results: dict, records: dict, split: str, key: str, title: str, path: str) -> bool:
    """One figure: each method's mean curve of ``key`` with its band; False when no run has it."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for name, method in results["methods"].items():
        per_seed = [curves(seed_records, key, split) for seed_records in records[name].values()]
        per_seed = [curve for curve in per_seed if curve[0]]
        if not per_seed:
            continue
        steps, mean, low, high = band_curve(per_seed)
        if not steps:
            continue
        line, = axes.plot(steps, mean, marker="o" if len(steps) < 30 else None, markersize=3,
                          label=f"{method['label']} (n={len(per_seed)})")
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        axes.set_xlabel("RL step")
        axes.set_ylabel(key if split == "train" else f"{split} {key}")
        axes.set_title(f"{title}: mean over seeds, 95% bootstrap band", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return drawn


def write_figures(results: dict, results_dir: str) -> list[tuple[str, str]]:
    """``figures/<split>_<key>.png`` for every ``FIGURES`` entry some run has; returns
    (path relative to ``results_dir``, title) of each."""
    import matplotlib

    matplotlib.use("Agg")
    records = load_records(results_dir)
    os.makedirs(os.path.join(results_dir, "figures"), exist_ok=True)
    written = []
    for split, key, title in FIGURES:
        relative = os.path.join("figures", f"{split}_{key.replace('/', '_')}.png")
        if _figure(results, records, split, key, title, os.path.join(results_dir, relative)):
            written.append((relative, title))
    return written


def write_report(results_dir: str) -> dict:
    """Writes ``results.json``, ``results.md`` and the figures of ``results_dir`` from its
    ``study.json`` and compact metrics; returns the results."""
    results = study_results(results_dir)
    figures = write_figures(results, results_dir)
    with open(os.path.join(results_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=False)
        handle.write("\n")
    with open(os.path.join(results_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results, figures))
    return results
