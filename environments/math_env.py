"""Math problems solved with a Python code interpreter (ReTool-style), one problem per episode.

Each ``step`` takes one assistant turn (see ``environments.tool_calls``):

* a well-formed ``code_interpreter`` call: the code runs in the ``Sandbox``; the observation
  is its output (stdout, stderr, an error line), cut in the middle to ``max_tool_output_chars``
  (reference 16384); ``num_tool_calls`` += 1; reward 0; not done;
* a malformed call (bad JSON, wrong tool, missing code, several calls): the observation is
  the error message, ``action_valid=False``, reward 0, not done (counted in
  ``num_invalid_calls``, not in ``num_tool_calls``);
* anything else is the final answer: graded, done. Reward = the verifier's score,
  +1 correct / -1 otherwise, from the last ``\\boxed{}`` in the last 300 characters of this
  turn (``environments.math_grading``).

After ``max_turns`` assistant turns (reference 8) the episode ends whatever the last turn was:
a call made on the last turn is counted but not run (its output could never be read), and the
turn is graded as the final response (normally -1, ``incomplete``). The ``StepResult`` carries
``num_tool_calls`` (calls so far in the episode) and ``incomplete`` (no extractable boxed answer;
per spec 5.14 *every* such response is flagged, tool use or not); ``info`` carries
``num_invalid_calls``, ``turns``, ``correct``, ``acc`` (= float(correct)), ``score``,
``extracted_answer``, ``grader_error``, ``turns_exhausted`` and, after a call, ``tool_status``.
The intrinsic tool-call bonus is the trainer's job (from ``num_tool_calls``).

The first observation is the problem with the reference's instruction appended:
``The answer format must be: \\boxed{'The final answer goes here.'}``.

Grading is the verifier's, and ``math-verify`` needs the main thread for its timeouts: call
``step`` from the main thread (run sandboxes concurrently with several envs if needed).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from environments.base import IndexedTasks, Observation, StepResult, choose_task_index
from environments.math_data import ANSWER_FORMAT_INSTRUCTION, MathProblem
from environments.math_grading import VERIFIERS, Grade, grade_response
from environments.sandbox import Sandbox
from environments.tool_calls import TOOL_NAME, parse_turn

Grader = Callable[[str, MathProblem], Grade]


def truncate_middle(text: str, max_chars: int) -> str:
    """``text`` if it fits in ``max_chars``, else its head and tail around a marker that says
    how many characters were cut; the result is never longer than ``max_chars``."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return text
    keep = max_chars
    while True:  # the marker states the exact cut; a longer count shortens what is kept
        marker = f"\n...[{len(text) - keep} characters truncated]...\n"
        if len(marker) >= max_chars:
            return text[:max_chars]
        if keep == max_chars - len(marker):
            break
        keep = max_chars - len(marker)
    head = (keep + 1) // 2
    return text[:head] + marker + text[len(text) - (keep - head):]


def answer_grader(verifier: str) -> Grader:
    """A grader comparing the response with the problem's ``answer`` using ``verifier``
    (``"math_verify"`` or the reference's ``"dapo_strict"``, see ``math_grading``)."""
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")

    def grade(response: str, problem: MathProblem) -> Grade:
        return grade_response(response, problem.answer, verifier=verifier)
    return grade


@dataclasses.dataclass(frozen=True)
class MathEnvConfig:
    """Episode limits and formatting.

    Attributes:
      max_turns: assistant turns per episode (reference 8).
      max_tool_output_chars: tool output shown to the model, cut in the middle (ref 16384).
      append_instruction: append the reference's boxed-answer instruction to the problem.
      accept_bare_fences: a turn with only a ```python block counts as a call.
      verifier: the built-in answer check, "math_verify" (symbolic equivalence, default) or
        "dapo_strict" (the reference: last 100 chars, exact string match); see math_grading.
    """

    max_turns: int = 8
    max_tool_output_chars: int = 16384
    append_instruction: bool = True
    accept_bare_fences: bool = True
    verifier: str = "math_verify"

    def __post_init__(self):
        if self.verifier not in VERIFIERS:
            raise ValueError(f"MathEnvConfig.verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if self.max_turns < 1:
            raise ValueError(f"MathEnvConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.max_tool_output_chars < 64:
            raise ValueError(f"MathEnvConfig.max_tool_output_chars must be >= 64, got "
                             f"{self.max_tool_output_chars}")


def problem_text(problem: str, append_instruction: bool = True) -> str:
    """The first observation of a problem: its text, then (by default) the reference's
    boxed-answer instruction on a new line."""
    return f"{problem}\n{ANSWER_FORMAT_INSTRUCTION}" if append_instruction else problem


class MathToolEnv(IndexedTasks):
    """One math problem per episode, solved with ``code_interpreter`` calls (module docstring).

    Args:
      problems: the task pool (``load_problems(...)`` or ``ProceduralProblems``).
      sandbox: executes the tool calls; shared by many envs is fine (it is thread-safe).
      config: episode limits.
      grader: ``(final response, problem) -> Grade``; default ``answer_grader(config.verifier)``.
        Pass e.g. ``ProceduralProblems.grade`` for generator-scored problems.
      seed: seeds the draw of a problem when ``reset`` gets neither ``task_id`` nor ``seed``.
    """

    name = "math_tool"
    domain = "math"

    def __init__(self, problems: Sequence[MathProblem], sandbox: Sandbox,
                 config: MathEnvConfig = MathEnvConfig(), grader: Grader | None = None,
                 seed: int = 0):
        if len(problems) == 0:
            raise ValueError("problems is empty")
        self.problems, self.sandbox, self.config = problems, sandbox, config
        self.grader = grader if grader is not None else answer_grader(config.verifier)
        self.max_steps = config.max_turns
        self._ids = {problems[i].id: i for i in range(len(problems))}
        self._rng = np.random.default_rng(seed)
        self._problem: MathProblem | None = None
        self._done = True

    @property
    def num_tasks(self) -> int:
        """Problems in this env's pool."""
        return len(self.problems)

    def reset(self, task_id: int | str | None = None, seed: int | None = None) -> Observation:
        """Starts an episode on problem ``task_id`` (index or id), else one drawn with ``seed``."""
        index = choose_task_index(task_id, seed, self.num_tasks, self._rng, "this env's problems", self._ids)
        self._problem = self.problems[index]
        self._turns = self._tool_calls = self._invalid_calls = 0
        self._done = False
        task = problem_text(self._problem.problem, self.config.append_instruction)
        self._observation = Observation(text=task, task=task)
        return self._observation

    @property
    def problem(self) -> MathProblem:
        if self._problem is None:
            raise RuntimeError("call reset() first")
        return self._problem

    def step(self, response_text: str) -> StepResult:
        """Handles one assistant turn (module docstring). Never raises on model text."""
        if self._done:
            raise RuntimeError("episode is over: call reset() before step()")
        if not isinstance(response_text, str):
            response_text = "" if response_text is None else str(response_text)
        self._turns += 1
        last_turn = self._turns >= self.config.max_turns
        parsed = parse_turn(response_text, TOOL_NAME, self.config.accept_bare_fences)
        info = {"turns": self._turns}
        if parsed.is_call:
            self._tool_calls += 1
        elif parsed.error is not None:
            self._invalid_calls += 1
        if parsed.attempted_call and not last_turn:
            if parsed.is_call:
                result = self.sandbox.run(parsed.code)
                text = truncate_middle(result.text(), self.config.max_tool_output_chars)
                info["tool_status"] = result.status
            else:
                text, info["error"] = parsed.error, parsed.error
            return self._continue(text, parsed.valid, info)
        return self._finish(response_text, parsed.valid, last_turn and parsed.attempted_call, info)

    def _continue(self, text: str, valid: bool, info: dict) -> StepResult:
        obs = Observation(text=text, task=self._observation.task)
        info.update(num_invalid_calls=self._invalid_calls, correct=False, acc=0.0)
        return StepResult(obs, reward=0.0, done=False, won=False, action_valid=valid, info=info,
                          num_tool_calls=self._tool_calls)

    def _finish(self, response: str, valid: bool, turns_exhausted: bool, info: dict) -> StepResult:
        grade = self.grader(response, self._problem)
        self._done = True
        info.update(num_invalid_calls=self._invalid_calls, correct=grade.correct,
                    acc=float(grade.correct), extracted_answer=grade.extracted,
                    grader_error=grade.grader_error, turns_exhausted=turns_exhausted,
                    score=grade.score)
        obs = Observation(text="", task=self._observation.task)
        return StepResult(obs, reward=grade.score, done=True, won=grade.correct, action_valid=valid,
                          info=info, num_tool_calls=self._tool_calls, incomplete=grade.incomplete)

    def close(self) -> None:
        """The sandbox is shared and owned by the caller; nothing else to release."""

