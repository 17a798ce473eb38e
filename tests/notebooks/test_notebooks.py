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
        "objectives_ablation_runs.png",
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


def test_paper_curves_opens_on_the_committed_study(executed):
    """Every method with runs in results/twx_methods is plotted, and the final held-out success
    the notebook prints is the study's own (results.json), in percent."""
    ns = executed("paper_curves.ipynb")["namespace"]
    assert ns["STUDY"] == "results/twx_methods" and not ns["RUNS"]
    results = json.loads((REPO_ROOT / "results" / "twx_methods" / "results.json").read_text())
    with_runs = {m["label"]: m for m in results["methods"].values() if m["seeds"]}
    assert set(ns["groups"]) == set(with_runs)
    for label, entry in with_runs.items():
        assert len(ns["groups"][label]) == len(entry["seeds"])
        assert ns["final_success"][label] == pytest.approx(100 * entry["final"]["mean"])
    # GRPO logs no replay metrics: reported as skipped, not an error.
    assert any(line.startswith("GRPO: train/replay/") for line in ns["missing"])


def test_paper_curves_on_run_directories(tmp_path):
    """Runs written by MetricsWriter with only some of the keys: two seeds of one method averaged,
    the final held-out success the mean of the last evaluations, SPEAR's gain paired by seed."""
    from spear_jax.metrics import MetricsWriter

    runs = {}
    for name, scale in (("SPEAR", 0.1), ("Dr.BoT", 0.05)):
        for seed in (0, 1):
            run_dir = tmp_path / f"{name}{seed}"
            writer = MetricsWriter(str(run_dir), tensorboard=False)
            for step in range(1, 11):
                writer.write(step, {"episode_return": step * 0.5, "actor/entropy": 1.0 / step})
                if step % 5 == 0:
                    writer.write(step, {"success_rate": scale * step - 0.1 * seed}, split="eval")
            writer.close()
            runs.setdefault(name, []).append(str(run_dir))
    result = run_notebook(
        NOTEBOOK_DIR / "paper_curves.ipynb", tmp_path / "figs",
        replace={"RUNS: dict[str, list[str]] = {}": f"RUNS = {runs!r}",
                 "PAPER_METHOD: dict[str, str] = {}": "PAPER_METHOD = {'SPEAR': 'Dr.BoT (GRPO) + SPEAR', "
                                                      "'Dr.BoT': 'Dr.BoT (GRPO)'}"})
    ns = result["namespace"]
    assert ns["final_success"] == {"SPEAR": pytest.approx(95.0), "Dr.BoT": pytest.approx(45.0)}
    assert ns["gain"]["seeds"] == [0, 1] and ns["gain"]["mean"] == pytest.approx(50.0)
    assert "SPEAR: train/replay/p50_mean (replay P50 baseline)" in ns["missing"]
    assert not any(key in line for key in ("train/episode_return", "train/actor/entropy", "eval/success_rate")
                   for line in ns["missing"])
    assert "paper_curves_curves.png" in result["pngs"]


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"RUNS: dict[str, list[str]] = {}": "RUNS = {'SPEAR': ['/nonexistent/run']}"}, "holds no metrics.jsonl"),
        ({'STUDY = "results/twx_methods"': 'STUDY = "results/no_such_study"'}, "study.json: missing"),
        ({'BENCHMARK = "ALFWorld"': 'BENCHMARK = "ALFworld"'}, "BENCHMARK = 'ALFworld' is not one of"),
        ({"PAPER_METHOD: dict[str, str] = {}": "PAPER_METHOD = {'Dr.BoT': 'DrBoT'}"},
         "rows .*DrBoT.* not in the ALFWorld table"),
    ],
)
def test_paper_curves_bad_settings_fail_clearly(tmp_path, replace, message):
    with pytest.raises(NotebookCellError, match=message):
        run_notebook(NOTEBOOK_DIR / "paper_curves.ipynb", tmp_path, replace=replace)


def test_ablation_section_reads_the_committed_ablation_runs(executed):
    ns = executed("objectives_ablation.ipynb")["namespace"]
    results = json.loads((REPO_ROOT / "results" / "twx_ablations" / "results.json").read_text())
    assert ns["ablation_results"] == results
    assert list(ns["ablation_records"]) == list(results["methods"])
    for name, entry in results["methods"].items():
        assert sorted(ns["ablation_records"][name]) == [r["seed"] for r in entry["seeds"]]


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
