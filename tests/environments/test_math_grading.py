"""Boxed-answer extraction and math-verify grading against real evaluation answers."""
import json
import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

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


def test_dapo_strict_is_the_references_exact_match_on_the_last_100_chars():
    strict = dict(verifier="dapo_strict")
    assert grade_response(r"so \boxed{25}", "25", **strict).correct
    assert not grade_response(r"\boxed{025}", "25", **strict).correct             # math-verify: correct
    assert not grade_response(r"\boxed{0.5}", r"\frac{1}{2}", **strict).correct   # math-verify: correct
    assert grade_response(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", **strict).correct
    boxed = r"\boxed{25}"
    assert grade_response(boxed + "." * (100 - len(boxed)), "25", **strict).correct
    late = grade_response(boxed + "." * (101 - len(boxed)), "25", **strict)
    assert late.incomplete and late.score == -1.0
    assert grade_response(boxed + "." * 150, "25").correct   # the sound verifier reads 300 chars
    # the last \boxed{ decides: unbalanced means no answer, no fallback to an earlier box
    assert grade_response(r"\boxed{25} and \boxed{2", "25", **strict).incomplete
    with pytest.raises(ValueError, match="verifier"):
        grade_response(boxed, "25", verifier="exact")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}frac0123456789.,-+^_()[] xyz$")), max_size=80),
       st.sampled_from(["25", r"\frac{1}{2}", r"\left( 3, \frac{\pi}{2} \right)", "x^2+1"]),
       st.sampled_from(["math_verify", "dapo_strict"]))
def test_fuzz_grading_never_raises(response, truth, verifier):
    g = grade_response(response, truth, verifier=verifier)
    assert g.score in (1.0, -1.0) and g.correct == (g.score == 1.0)
    assert not (g.correct and g.incomplete)
