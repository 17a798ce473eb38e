"""Final-answer extraction and grading for math problems.

The reference verifier (DAPO's math scorer, strict boxed mode) looks only at the last 300
characters of the response, takes the last ``\\boxed{...}`` there and scores +1 if it matches the
ground truth, -1 otherwise; a response without an extractable boxed answer scores -1 and is
flagged incomplete (spec 5.14: the reference's attempt to treat some of those differently is a
no-op, so *every* response without a boxed answer is flagged).

Two verifiers (``VERIFIERS``):

* ``"math_verify"`` (default, sound): the last boxed answer in the last 300 characters, judged
  equivalent by ``math-verify`` (symbolic: ``\\frac{1}{2}`` = ``0.5``, ``025`` = ``25``,
  ``1,450,000`` = ``1450000``, tuples, intervals, LaTeX).
* ``"dapo_strict"`` (faithful): the reference's strict boxed check. Of the 300-character window
  it keeps only the last 100 characters, takes the last ``\\boxed{`` there (an unbalanced last
  one means no answer) and requires its content to be *string-identical* to the ground truth, so
  ``\\boxed{0.5}`` for ``\\frac{1}{2}`` and ``\\boxed{ 25}`` for ``25`` score -1. math-verify guards its sympy work with signal-based
timeouts that only work in the main thread; off the main thread the timeouts are disabled
(logged once). Any exception or timeout inside math-verify counts as incorrect and sets
``grader_error``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading

from math_verify import parse, verify

_LOG = logging.getLogger(__name__)

ANSWER_WINDOW_CHARS = 300  # the reference verifier reads only this many trailing characters
STRICT_WINDOW_CHARS = 100  # ... and its strict boxed mode only the last 100 of those
VERIFIERS = ("math_verify", "dapo_strict")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None.

    ``\\boxed 5`` (no braces, a single token) is accepted too, as LaTeX allows it.
    """
    best_start, best_cmd = -1, ""
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        if pos > best_start:
            best_start, best_cmd = pos, cmd
    while best_start != -1:
        content = _braced_argument(text, best_start + len(best_cmd))
        if content is not None:
            return content
        # unbalanced: try an earlier occurrence
        earlier = max(text.rfind(cmd, 0, best_start) for cmd in _BOX_COMMANDS)
        best_start = earlier
        best_cmd = next((c for c in _BOX_COMMANDS if text.startswith(c, best_start)), "")
    return None


def _braced_argument(text: str, pos: int) -> str | None:
    """The argument starting at ``pos`` (after the command name): ``{...}`` balanced, or
    `` token``."""
    if pos < len(text) and text[pos] == " ":
        token = text[pos + 1:].split(maxsplit=1)
        return token[0].rstrip("$.") if token and token[0].rstrip("$.") else None
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1:i]
    return None


@dataclasses.dataclass(frozen=True)
class Grade:
    """The verifier's verdict on one response.

    Attributes:
      score: +1.0 correct, -1.0 otherwise (the reference verifier's scale).
      correct: the extracted answer is equivalent to the ground truth.
      extracted: the boxed answer found in the answer window, or None.
      incomplete: no (non-empty) boxed answer could be extracted.
      grader_error: math-verify raised or timed out (counted as incorrect).
    """

    score: float
    correct: bool
    extracted: str | None
    incomplete: bool
    grader_error: str | None = None


def extract_final_answer(response: str, window: int = ANSWER_WINDOW_CHARS) -> str | None:
    """The last boxed answer within the last ``window`` characters of ``response``."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return last_boxed_content(response[-window:])


_warned_thread = False


def answers_equivalent(predicted: str, ground_truth: str, timeout_s: int = 5) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain). May raise."""
    global _warned_thread
    main = threading.current_thread() is threading.main_thread()
    if not main and not _warned_thread:
        _LOG.warning("math-verify called off the main thread: its timeouts are disabled")
        _warned_thread = True
    timeout = timeout_s if main else None
    gold = parse(f"${ground_truth}$", parsing_timeout=timeout, raise_on_error=True)
    if not gold:  # not LaTeX-parsable (e.g. a plain word): let math-verify try the raw string
        gold = parse(ground_truth, parsing_timeout=timeout, raise_on_error=True)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout, raise_on_error=True)
    if not gold or not pred:
        return predicted.strip() == ground_truth.strip()
    return bool(verify(gold, pred, timeout_seconds=timeout, raise_on_error=True))


def grade_strict_boxed(response: str, ground_truth: str) -> Grade:
    """The reference's strict boxed verifier (``"dapo_strict"``, module docstring)."""
    tail = response[-ANSWER_WINDOW_CHARS:][-STRICT_WINDOW_CHARS:]
    start = tail.rfind("\\boxed{")
    extracted = _braced_argument(tail, start + len("\\boxed")) if start != -1 else None
    if extracted is None:
        return Grade(score=-1.0, correct=False, extracted=None, incomplete=True)
    correct = extracted == ground_truth
    return Grade(score=1.0 if correct else -1.0, correct=correct, extracted=extracted,
                 incomplete=False)


def grade_response(response: str, ground_truth: str, window: int = ANSWER_WINDOW_CHARS,
                   timeout_s: int = 5, verifier: str = "math_verify") -> Grade:
    """Grades a full response against ``ground_truth`` (see module docstring). Never raises
    on model text."""
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    if verifier == "dapo_strict":
        return grade_strict_boxed(response, ground_truth)
    extracted = extract_final_answer(response, window)
    if extracted is None or not extracted.strip():
        return Grade(score=-1.0, correct=False, extracted=extracted, incomplete=True)
    try:
        correct = answers_equivalent(extracted, ground_truth, timeout_s)
    except Exception as err:  # noqa: BLE001 (math-verify / sympy can raise anything, incl. timeouts)
        return Grade(score=-1.0, correct=False, extracted=extracted, incomplete=False,
                     grader_error=f"{type(err).__name__}: {err}")
    return Grade(score=1.0 if correct else -1.0, correct=correct, extracted=extracted,
                 incomplete=False)
