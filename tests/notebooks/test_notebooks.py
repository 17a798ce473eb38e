"""Executes every code cell of every notebook in ``notebooks/``, in order, in a fresh namespace.

No Jupyter is needed: the ``.ipynb`` JSON is read with the standard library and each code cell is
``exec``-ed with the repository root as working directory and on ``sys.path``, matplotlib on the
Agg backend, and ``SPEAR_NOTEBOOK_FIGDIR`` pointing at a temporary directory (the notebooks save
their figures there). A cell that raises fails the test, naming the notebook and the cell.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
SPEC = Path("/work/shared/spec/spear_reference.md")
FIGDIR_ENV = "SPEAR_NOTEBOOK_FIGDIR"

EXPECTED_FIGURES = {
    "objectives_ablation.ipynb": {
        "objectives_advantages.png",
        "objectives_ppo_surrogate.png",
        "objectives_clip_cov.png",
        "objectives_aggregation_length_bias.png",
        "objectives_schedules.png",
        "objectives_replay.png",
    },
    "paper_curves.ipynb": {"paper_curves_curves.png"},
}


class NotebookCellError(AssertionError):
    """A code cell raised; the message names the notebook, the cell and its first lines."""


def load_notebook(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(notebook: dict) -> list[str]:
    return [cell_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]


@contextlib.contextmanager
def notebook_environment(fig_dir: Path):
    """Repo root as cwd and on sys.path, Agg backend, figure dir and temp dir set; all restored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved_env = {k: os.environ.get(k) for k in ("MPLBACKEND", FIGDIR_ENV)}
    saved_cwd, saved_path, saved_tempdir = os.getcwd(), list(sys.path), tempfile.tempdir
    os.environ["MPLBACKEND"] = "Agg"
    os.environ[FIGDIR_ENV] = str(fig_dir)
    tempfile.tempdir = str(fig_dir)  # files a notebook writes to a temp dir stay under tmp_path
    os.chdir(REPO_ROOT)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    plt.close("all")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")
            yield
    finally:
        plt.close("all")
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(name: str, sources: list[str]) -> dict:
    """Runs ``sources`` in order in one fresh namespace; returns the namespace and figure numbers."""
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(sources):
        try:
            exec(compile(source, f"<{name} code cell {index}>", "exec"), namespace)
        except Exception as error:  # noqa: BLE001  (any failure of a cell fails the notebook)
            head = "\n".join(source.splitlines()[:3])
            raise NotebookCellError(
                f"{name}: code cell {index} raised {type(error).__name__}: {error}\n--- cell starts:\n{head}"
            ) from error
    return {"namespace": namespace, "figures": list(plt.get_fignums())}


def run_notebook(path: Path, fig_dir: Path, replace: dict[str, str] | None = None) -> dict:
    sources = code_cells(load_notebook(path))
    for old, new in (replace or {}).items():
        hits = [i for i, s in enumerate(sources) if old in s]
        assert hits, f"{old!r} not found in {path.name}"
        sources[hits[0]] = sources[hits[0]].replace(old, new, 1)
    with notebook_environment(fig_dir):
        result = execute(path.name, sources)
    result["pngs"] = sorted(p.name for p in fig_dir.glob("*.png"))
    return result


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Each notebook executed once, as shipped."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = run_notebook(NOTEBOOK_DIR / name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------
# Structure


def test_expected_notebooks_exist():
    assert set(NOTEBOOKS) == set(EXPECTED_FIGURES)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_valid_nbformat4_without_outputs(name):
    notebook = load_notebook(NOTEBOOK_DIR / name)
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 4
    assert isinstance(notebook["metadata"], dict)
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    ids = [c.get("id") for c in cells]
    assert all(isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    kinds = [c["cell_type"] for c in cells]
    assert set(kinds) <= {"markdown", "code"}
    assert kinds[0] == "markdown", "a notebook opens with a markdown title"
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3
    for cell in cells:
        assert isinstance(cell["metadata"], dict)
        source = cell["source"]
        assert isinstance(source, (str, list)) and all(isinstance(line, str) for line in source)
        assert cell_source(cell).strip(), "empty cell"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "stored outputs"
        else:
            assert "outputs" not in cell and "execution_count" not in cell
    for source in code_cells(notebook):
        compile(source, name, "exec")


def test_harness_reports_a_raising_cell(tmp_path):
    with notebook_environment(tmp_path), pytest.raises(NotebookCellError, match="code cell 1 raised ZeroDivisionError"):
        execute("broken.ipynb", ["x = 1", "y = x / 0", "z = 2"])


# ------------------------------------------------------------------------------------------------
# Execution


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws(executed, name):
    result = executed(name)
    assert result["figures"], f"{name} created no matplotlib figure"
    assert EXPECTED_FIGURES[name] <= set(result["pngs"]), result["pngs"]


def test_ablation_uses_the_project_functions(executed):
    from spear_jax.objectives import compute_advantages, policy_objective
    from spear_jax.replay import ReplayBuffer

    ns = executed("objectives_ablation.ipynb")["namespace"]
    assert ns["compute_advantages"] is compute_advantages
    assert ns["policy_objective"] is policy_objective
    assert isinstance(ns["buffer"], ReplayBuffer) and ns["replays"], "replay never fired"
    # The ablation table covers the listed variants and they really differ.
    assert {"SPEAR (on-policy)", "no Clip-Cov (vanilla + dual clip)", "symmetric clip (eps_high 0.2)"} <= set(
        ns["ablations"])
    assert ns["ablations"]["symmetric clip (eps_high 0.2)"].policy.eps_high == 0.2
    assert ns["ablations"]["no Clip-Cov (vanilla + dual clip)"].policy.loss_mode == "vanilla"


def test_paper_curves_demo_is_labelled_synthetic(executed):
    ns = executed("paper_curves.ipynb")["namespace"]
    assert ns["SYNTHETIC_DEMO"] is True
    assert set(ns["final_success"]) == {"SPEAR", "Dr.BoT"}
    # The Dr.BoT demo run logs no replay metrics: they are reported as skipped, not an error.
    assert any(line.startswith("Dr.BoT: train/replay/") for line in ns["missing"])


def test_paper_curves_on_a_real_run_directory(tmp_path):
    """A run written by MetricsWriter with only some of the keys: final eval = last eval value."""
    from spear_jax.metrics import MetricsWriter

    run_dir = tmp_path / "run"
    writer = MetricsWriter(str(run_dir), tensorboard=False)
    for step in range(1, 11):
        writer.write(step, {"rollout/episode_return": step * 0.5, "actor/entropy": 1.0 / step})
        if step % 5 == 0:
            writer.write(step, {"success_rate": 0.1 * step}, split="eval")
    writer.close()
    result = run_notebook(
        NOTEBOOK_DIR / "paper_curves.ipynb",
        tmp_path / "figs",
        replace={"RUNS: dict[str, str] = {}": f"RUNS = {{'SPEAR': {str(run_dir)!r}}}"},
    )
    ns = result["namespace"]
    assert ns["SYNTHETIC_DEMO"] is False
    assert ns["final_success"] == {"SPEAR": pytest.approx(100.0)}
    assert "SPEAR: train/replay/p50_mean (replay P50 baseline)" in ns["missing"]
    logged = ("train/rollout/episode_return", "train/actor/entropy", "eval/success_rate")
    assert not any(key in line for key in logged for line in ns["missing"])
    assert "SPEAR: train/rollout/success_rate (train success)" in ns["missing"]
    assert "paper_curves_curves.png" in result["pngs"]


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"RUNS: dict[str, str] = {}": "RUNS = {'SPEAR': '/nonexistent/run'}"}, "holds no metrics.jsonl"),
        ({'BENCHMARK = "ALFWorld"': 'BENCHMARK = "ALFworld"'}, "BENCHMARK = 'ALFworld' is not one of"),
        ({'"Dr.BoT": "Dr.BoT (GRPO)"}': '"Dr.BoT": "DrBoT"}'}, "PAPER_METHOD .*DrBoT.* not in the ALFWorld table"),
    ],
)
def test_paper_curves_bad_settings_fail_clearly(tmp_path, replace, message):
    with pytest.raises(NotebookCellError, match=message):
        run_notebook(NOTEBOOK_DIR / "paper_curves.ipynb", tmp_path, replace=replace)


# ------------------------------------------------------------------------------------------------
# The paper numbers in paper_curves.ipynb against the spec's tables (section 1.2)


def _spec_headline_tables(text: str) -> dict[str, dict[str, float]]:
    """Parses the two result tables of spec 1.2 into {benchmark: {method: value}}."""
    section = text.split("### 1.2", 1)[1].split("\nAbstract", 1)[0]
    tables: dict[str, dict[str, float]] = {}
    previous = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("Method", "") or set(cells[0]) <= {"-"}:
            continue
        number = lambda cell: None if cell.startswith("–") else float(cell.split()[0])  # noqa: E731
        if len(cells) == 3:  # | Method | ALFWorld | WebShop (SR) |
            method = f"{previous} + SPEAR" if cells[0] == "+ SPEAR" else cells[0]
            previous = previous if cells[0] == "+ SPEAR" else cells[0]
            tables.setdefault("ALFWorld", {})[method] = number(cells[1])
            tables.setdefault("WebShop", {})[method] = number(cells[2])
        elif len(cells) == 4:  # | Method | Model | AIME24 | AIME25 |
            model = cells[1].split(" (")[0]
            base = f"{previous} + SPEAR" if cells[0] == "+ SPEAR" else cells[0]
            previous = previous if cells[0] == "+ SPEAR" else cells[0]
            for benchmark, cell in (("AIME24", cells[2]), ("AIME25", cells[3])):
                value = number(cell)
                if value is not None:
                    tables.setdefault(benchmark, {})[f"{base}, {model}"] = value
    return tables


@pytest.mark.skipif(not SPEC.is_file(), reason="spec file not available on this machine")
def test_headline_numbers_match_the_spec(executed):
    expected = _spec_headline_tables(SPEC.read_text(encoding="utf-8"))
    assert sum(len(v) for v in expected.values()) == 8 + 8 + 4 + 6
    headline = executed("paper_curves.ipynb")["namespace"]["PAPER_HEADLINE"]
    assert set(headline) == set(expected)
    for benchmark, rows in expected.items():
        assert set(headline[benchmark]) == set(rows), benchmark
        for method, value in rows.items():
            assert math.isclose(headline[benchmark][method], value), (benchmark, method)
