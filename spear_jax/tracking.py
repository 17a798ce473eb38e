"""Experiment-tracking backends behind ``metrics.MetricsWriter``: wandb and mlflow.

``config.logging.backends`` names where a run's metrics go. ``"jsonl"`` (``metrics.jsonl``, the
run's own record, read by the plots and by resume) is always on; ``"tensorboard"`` is written by
the writer itself; ``"wandb"`` and ``"mlflow"`` are optional installs
(``pip install -e '.[tracking]'``) checked at start-up. Every backend receives the same scalars
as the JSONL, named ``<split>/<name>`` at the run step, and the trajectory tables
(``spear_jax.trajectories``).

* wandb: ``wandb.init(project=logging.project, name=logging.run_name, dir=<workdir>,
  mode=logging.wandb_mode)`` -- ``offline`` (the default) writes ``<workdir>/wandb/offline-run-*``
  for a later ``wandb sync``; ``online`` needs ``wandb login``. Tables become ``wandb.Table``.
* mlflow: an ``MlflowClient`` on ``logging.mlflow_tracking_uri`` (default: the file store
  ``<workdir>/mlruns``), experiment ``logging.project``; scalars through ``log_batch``, the run
  config as the artifact ``config.json``, tables as JSON artifacts ``<name>/step_<step>.json``.
  A file store keeps each metric as a file under its path, so there the ``/`` inside a metric
  name become ``.`` (``train/rollout.success_rate``); other stores keep the JSONL names.

The backend's run id is kept in ``<workdir>/<backend>_run_id`` so a resumed run continues the
same wandb / mlflow run. Steps run again after a resume are logged again: mlflow then holds two
values of such a step; online wandb ignores a step at or below its last one (its history only
moves forward), so it keeps the first attempt's values.
"""
from __future__ import annotations

import importlib
import os
import time
import uuid
from collections.abc import Mapping, Sequence

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
WANDB_MODES = ("online", "offline", "disabled")
# Backend -> (module to import, what to pip-install).
_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}


class TrackingError(ValueError):
    """A ``config.logging`` setting that cannot work, naming the field and the fix."""


def check_backends(backends: Sequence[str]) -> None:
    """Raises ``TrackingError`` for unknown backends, a list without ``"jsonl"``, or a backend
    whose package is missing (the other ``config.logging`` fields have ``run_config`` rules)."""
    backends = tuple(backends)
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise TrackingError(f"config.logging.backends has unknown {unknown}; choose from {list(BACKENDS)} "
                            f"(on the command line a tuple: \"--config.logging.backends=('jsonl','wandb')\")")
    if "jsonl" not in backends:
        raise TrackingError("config.logging.backends must include 'jsonl' (metrics.jsonl is the run's "
                            "record, read by resume and the plots)")
    for name in backends:
        if name in _PACKAGES:
            _require(name)


def _require(backend: str):
    """The backend's module, or a ``TrackingError`` saying how to install it."""
    module, package = _PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrackingError(
            f"config.logging.backends includes {backend!r} but {module!r} is not installed ({error}); "
            f"run: pip install {package}  (or pip install -e '.[tracking]'), or remove {backend!r} "
            f"from config.logging.backends") from error


def make_backends(logging, workdir: str, run_config: Mapping | None = None) -> list:
    """The wandb / mlflow backends ``logging.backends`` asks for (jsonl and tensorboard are the
    writer's own), each opened on ``workdir`` with ``run_config`` recorded as the run's config."""
    check_backends(logging.backends)
    run_name = logging.run_name or os.path.basename(os.path.normpath(workdir))
    backends = []
    if "wandb" in logging.backends:
        backends.append(WandbBackend(workdir, logging.project, run_name, logging.wandb_mode, run_config))
    if "mlflow" in logging.backends:
        uri = logging.mlflow_tracking_uri or default_mlflow_uri(workdir)
        backends.append(MlflowBackend(workdir, uri, logging.project, run_name, run_config))
    return backends


def default_mlflow_uri(workdir: str) -> str:
    return "file://" + os.path.join(os.path.abspath(workdir), "mlruns")


def _saved_run_id(workdir: str, backend: str) -> str | None:
    path = os.path.join(workdir, f"{backend}_run_id")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip() or None


def _save_run_id(workdir: str, backend: str, run_id: str) -> None:
    with open(os.path.join(workdir, f"{backend}_run_id"), "w", encoding="utf-8") as handle:
        handle.write(run_id)


class WandbBackend:
    """Scalars and tables of one run to wandb (``mode`` online / offline / disabled)."""

    def __init__(self, workdir: str, project: str, run_name: str, mode: str, run_config: Mapping | None):
        wandb = _require("wandb")
        self._wandb = wandb
        run_id = _saved_run_id(workdir, "wandb") or uuid.uuid4().hex[:8]
        self.run = wandb.init(project=project, name=run_name, dir=workdir, mode=mode, id=run_id,
                              resume="allow", config=dict(run_config or {}),
                              settings=wandb.Settings(silent=True, console="off"))
        _save_run_id(workdir, "wandb", run_id)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=int(step))

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                     step=int(step))

    def close(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # finish() returns before the service writes the run file out


class MlflowBackend:
    """Scalars (``log_batch``) and tables (JSON artifacts) of one run to an mlflow tracking store."""

    def __init__(self, workdir: str, tracking_uri: str, experiment: str, run_name: str,
                 run_config: Mapping | None):
        _require("mlflow")
        self.file_store = tracking_uri.startswith("file:") or "://" not in tracking_uri
        if self.file_store:
            # mlflow >= 3.7 refuses file stores unless opted in; the file store needs no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = _saved_run_id(workdir, "mlflow")
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            _save_run_id(workdir, "mlflow", self.run_id)
            if run_config:
                self.client.log_dict(self.run_id, dict(run_config), "config.json")
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        millis = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[
            Metric(_mlflow_key(name, self.file_store), float(value), millis, int(step)) for name, value in scalars.items()])

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        table = {"columns": list(columns), "data": [list(r) for r in rows]}
        self.client.log_dict(self.run_id, table, f"{name}/step_{int(step):06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(name: str, file_store: bool) -> str:
    """``<split>/<name>`` as an mlflow key: characters mlflow rejects (outside letters, digits and
    ``_ - . / space :``) become ``_``; in a file store, where each metric is a file under its
    ``/``-separated path, the ``/`` after the split become ``.`` (``rollout/success_rate`` and
    ``rollout/success_rate/<task>`` cannot both be files)."""
    key = "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in name)
    if file_store:
        split, _, rest = key.partition("/")
        key = f"{split}/{rest.replace('/', '.')}"
    return key


def metrics_writer(config, workdir: str):
    """The run's ``MetricsWriter``: JSONL, TensorBoard when ``config.logging.backends`` names it,
    and the wandb / mlflow backends it names (the run config recorded with them). Process 0 of
    a multi-process run writes the run's records; the others get a ``distributed.SilentWriter``."""
    from spear_jax import distributed
    from spear_jax.metrics import MetricsWriter

    if not distributed.is_writer():
        return distributed.SilentWriter()

    backends = make_backends(config.logging, workdir, config.to_dict())
    return MetricsWriter(workdir, tensorboard="tensorboard" in config.logging.backends, backends=backends)
