"""Boxed-answer extraction and math-verify grading against real evaluation answers."""
import json
import os
import threading

import pytest

from environments.math_grading import ANSWER_WINDOW_CHARS, extract_final_answer, grade_response, last_boxed_content

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "math")


def _records(name):
    with open(os.path.join(DATA, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_last_boxed_content_balanced_braces():
    assert last_boxed_content(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed_content(r"\boxed{a{b}c} and an unclosed \boxed{") == "a{b}c"
    assert last_boxed_content(r"\fbox{7}") == "7"
    assert last_boxed_content(r"so \boxed 5.") == "5"
    assert last_boxed_content("no answer") is None


def test_answer_window_is_the_last_300_chars():
    answer = r"\boxed{25}"
    assert extract_final_answer(answer + "x" * (ANSWER_WINDOW_CHARS - len(answer))) == "25"
    assert extract_final_answer(answer + "x" * (ANSWER_WINDOW_CHARS - len(answer) + 1)) is None
    g = grade_response(answer + " " * 400, "25")
    assert g.incomplete and g.score == -1.0 and not g.correct


@pytest.mark.parametrize("response, truth, correct", [
    (r"The answer is \boxed{25}.", "25", True),           # AIME, plain
    (r"\boxed{025}", "25", True),                          # leading zeros
    (r"\boxed{24}", "25", False),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),                # fraction vs decimal
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
    (r"\boxed{4.67}", r"\frac{14}{3}", False),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),  # MATH-500 tuple
    (r"\boxed{1,450,000}", "1450000", True),              # GSM8K thousands separator
    (r"\boxed{-10}", "-10", True),
    (r"\boxed{x^2+1}", "1+x^2", True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
])
def test_grades(response, truth, correct):
    g = grade_response(response, truth)
    assert g.correct is correct and g.score == (1.0 if correct else -1.0) and not g.incomplete


def test_missing_or_empty_box_is_incomplete():
    for response in ("The answer is 25.", r"\boxed{}", r"\boxed{  }"):
        g = grade_response(response, "25")
        assert g.incomplete and not g.correct and g.score == -1.0


@pytest.mark.parametrize("name", ["aime2024", "aime2025", "gsm8k_test"])
def test_every_real_answer_matches_itself_and_not_its_successor(name):
    rows = _records(name)[:60]
    for row in rows:
        assert grade_response(f"... \\boxed{{{row['answer']}}}", row["answer"]).correct, row["id"]
        wrong = str(int(row["answer"]) + 1)
        assert not grade_response(f"\\boxed{{{wrong}}}", row["answer"]).correct, row["id"]


def test_math500_latex_answers_match_themselves():
    rows = _records("math500")[:80]
    failures = [r["answer"] for r in rows if not grade_response(f"\\boxed{{{r['answer']}}}", r["answer"]).correct]
    assert failures == []


def test_grader_exceptions_become_incorrect_with_flag(monkeypatch):
    from environments import math_grading

    def boom(*args, **kwargs):
        raise TimeoutError("sympy took too long")
    monkeypatch.setattr(math_grading, "verify", boom)
    g = grade_response(r"\boxed{3}", "3")
    assert not g.correct and g.score == -1.0 and "TimeoutError" in g.grader_error


def test_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(grade_response(r"\boxed{0.5}", r"\frac12")))
    t.start()
    t.join()
    assert out[0].correct
