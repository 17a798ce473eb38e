"""Run metrics: JSONL + TensorBoard writers, and curve plots of any run.

Each ``MetricsWriter.write(step, metrics, split)`` appends one JSON line
``{"step": ..., "split": ..., "time": ..., <name>: <float>, ...}`` to
``<workdir>/metrics.jsonl`` and the same scalars to TensorBoard under ``<split>/<name>``.
Non-finite values are written as JSON ``null`` (standard JSON has no NaN) and skipped in
TensorBoard; they still appear in the log so a diverging run is visible. Tracking backends
(``spear_jax.tracking``: wandb, mlflow) receive the same finite scalars as ``<split>/<name>``;
``write_table`` sends a table (sampled trajectories) to TensorBoard text and to every backend.

Plot a run's curves from the shell::

    python -m spear_jax.metrics --workdir=/path/to/run --keys=reward,success,entropy
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"  # the run config record_config writes into the workdir
# Metric -> the short name shown after the console progress bar.
PROGRESS_KEYS = {"success_rate": "success", "episode_return": "return", "actor/entropy": "entropy",
                 "replay/buffer_rows": "buffer", "sft/nll": "nll", "time/step": "s/step"}
_TB_FILE_NUMBERS = itertools.count()  # event files this process has opened


def _as_float(value) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _record_step(line: str) -> int | None:
    """The step of one JSONL record, or None for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    """Appends scalar metrics of a run to JSONL and (optionally) TensorBoard.

    A resumed run first calls ``discard_from(restored step + 1)`` (a fresh one ``discard_from(0)``)
    so that the steps it writes again appear once: in the JSONL file and, through TensorBoard's
    purge marker, in TensorBoard.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, backends: Sequence = ()):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.backends = list(backends)
        self._path = os.path.join(workdir, METRICS_FILE)
        self._jsonl = open(self._path, "a", encoding="utf-8")
        self._tensorboard = tensorboard
        self._tb = None  # opened at the first write, after any discard_from
        self._purge_step: int | None = None

    def _tb_writer(self):
        if self._tb is None and self._tensorboard:
            from tensorboardX import SummaryWriter

            # A unique file name per writer: tensorboardX names event files by the second and
            # would truncate an earlier file of the same second.
            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), purge_step=self._purge_step,
                                     filename_suffix=f".{os.getpid()}-{next(_TB_FILE_NUMBERS)}")
        return self._tb

    def discard_from(self, step: int) -> int:
        """Drops the records of steps >= ``step``; returns how many were dropped.

        ``metrics.jsonl`` is rewritten atomically (the kept records into a temporary file,
        fsynced, renamed over it); an unparseable line (a write cut by a kill) is dropped too.
        TensorBoard gets a new event file starting with a ``SessionLog.START`` at ``step``, which
        makes it hide every earlier event of step >= ``step``.
        """
        self._jsonl.close()
        kept, dropped = [], 0
        with open(self._path, encoding="utf-8") as handle:
            for line in filter(str.strip, handle):
                record_step = _record_step(line)
                if record_step is not None and record_step < step:
                    kept.append(line)
                else:
                    dropped += 1
        if dropped:
            with open(self._path + ".tmp", "w", encoding="utf-8") as handle:
                handle.writelines(kept)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(self._path + ".tmp", self._path)
        self._jsonl = open(self._path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = int(step)
        return dropped

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        record = {"step": int(step), "split": split, "time": time.time()}
        for name, value in metrics.items():
            if name in record:
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = _as_float(value)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"{split}/{name}": value for name, value in record.items()
                   if name not in ("step", "split", "time") and value is not None}
        tb = self._tb_writer()
        if tb is not None:
            for name, value in scalars.items():
                tb.add_scalar(name, value, int(step))
            tb.flush()
        for backend in self.backends:
            backend.log_scalars(int(step), scalars)

    def write_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        """A table (e.g. sampled trajectories): TensorBoard text (a markdown table under
        ``name``) and each backend's table (wandb.Table, mlflow JSON artifact)."""
        tb = self._tb_writer()
        if tb is not None:
            tb.add_text(name, markdown_table(columns, rows), int(step))
            tb.flush()
        for backend in self.backends:
            backend.log_table(int(step), name, columns, rows)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for backend in self.backends:
            backend.close()


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; cell text has ``|`` escaped and newlines as ``<br>``."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress_bar(total: int, initial: int = 0, desc: str = ""):
    """A console progress bar over optimisation steps (tqdm, on stderr)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def progress_summary(metrics: Mapping[str, float]) -> dict[str, str]:
    """The ``PROGRESS_KEYS`` present in ``metrics``, by short name, for the bar's postfix."""
    return {short: f"{metrics[key]:.3g}" for key, short in PROGRESS_KEYS.items() if key in metrics}


def read_metrics(path: str) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (or of ``<path>/metrics.jsonl`` for a directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def curves(records: Iterable[dict], key: str, split: str = "train") -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in ``split``, skipping records without a finite value. When a
    resumed run rewrote a step, the last record of that step wins."""
    by_step: dict[int, float] = {}
    for record in records:
        if record.get("split") == split and record.get(key) is not None:
            by_step[int(record["step"])] = float(record[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(path: str, keys: Sequence[str], out_dir: str | None = None,
             splits: Sequence[str] = ("train", "eval")) -> list[str]:
    """Writes one PNG per key (every split that has it drawn on the same axes); returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    out_dir = out_dir or (path if os.path.isdir(path) else os.path.dirname(path))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key in keys:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for split in splits:
            steps, values = curves(records, key, split)
            if steps:
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=split)
                drawn = True
        if not drawn:
            plt.close(figure)
            continue
        axes.set_xlabel("step")
        axes.set_ylabel(key)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        target = os.path.join(out_dir, f"curve_{key.replace('/', '_')}.png")
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    return written


def record_config(workdir: str, config) -> None:
    """Writes ``workdir/config.json``, the config the run goes on with (atomically, so a kill
    leaves the previous record; a resume refused for its config never reaches this). Written by
    process 0 of a multi-process run."""
    from spear_jax import distributed

    if not distributed.is_writer():
        return
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as handle:
        handle.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Plot a run's metric curves to PNG files.")
    parser.add_argument("--workdir", required=True, help="run directory or metrics.jsonl path")
    parser.add_argument("--keys", required=True, help="comma-separated metric names")
    parser.add_argument("--out_dir", default=None)
    args = parser.parse_args(argv)
    for path in plot_run(args.workdir, [k for k in args.keys.split(",") if k], args.out_dir):
        print(path)


if __name__ == "__main__":
    main()

