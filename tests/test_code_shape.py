"""The package's shape limits: no function over 60 lines, the Trainer class under 200."""
import ast
import pathlib

import pytest

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spear_jax"
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 200


def _definitions(kind):
    for path in sorted(_PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                yield path.relative_to(_PACKAGE.parent), node


def _lines(node) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = [f"{path}:{node.lineno} {node.name} ({_lines(node)} lines)"
            for path, node in _definitions((ast.FunctionDef, ast.AsyncFunctionDef))
            if _lines(node) > MAX_FUNCTION_LINES]
    assert not long, "split these functions: " + ", ".join(long)


def test_the_trainer_class_stays_under_200_lines():
    (trainer,) = [node for path, node in _definitions(ast.ClassDef) if node.name == "Trainer"]
    assert _lines(trainer) < MAX_TRAINER_LINES
