"""Scripted pieces for rollout tests: a ChatML tokenizer, a text-emitting sampler, a tiny env.

* ``chatml_tokenizer()``: the project's ChatML template over a byte-level BPE trained here on a
  small corpus (``small_bpe``); ``chatml_text`` writes a whole conversation as ChatML text, so
  tests can tokenise the full text and compare with the engine's stream.
* ``ScriptedSampler``: ``policy(context_text) -> response text``; emits ``encode(text)`` plus the
  end token, with fixed logprobs, cut at ``max_new_tokens`` (or a session row's own cap; finish
  ``"length"``). Its sessions keep each row's token history and give the policy the decoded
  history.
* ``SayNumberEnv``: "say the number shown"; deterministic; can be told to raise.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from environments.base import Observation, StepResult
from environments.prompts import AgentPromptStyle
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.tokenizer import HFTokenizer
from spear_jax.rollout import TemplateChatTokenizer
from spear_jax.sampling import Generation

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

_CORPUS = [
    "You are an expert agent. Your task is to: say the number shown. Your current observation is:",
    "<think>I see the number, I say it.</think><action>say 12</action>",
    "Prior to this step, you have already taken 2 step(s). Below are the most recent observations",
    "and the corresponding actions you took: [Observation 1: 'Number: 5', Action 1: 'say 5']",
    "print(1 + 2) tool output: 3 The answer is \\boxed{42}. Error: ValueError traceback",
    "user assistant system tool admissible actions current situation reasoning step-by-step",
    "open door, go north, take apple from table, put apple in fridge, look around, inventory",
] * 4


def chatml_text(messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The ChatML rendering of ``messages`` (each ``<|im_start|>role\\ncontent<|im_end|>\\n``)."""
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def small_bpe(vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE trained on ``_CORPUS`` with ``<pad>`` and the ChatML markers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def chatml_tokenizer(tokenizer: Tokenizer | None = None) -> TemplateChatTokenizer:
    """The engine's tokenizer: the project's ChatML template over ``small_bpe()`` (or over
    ``tokenizer``, an ``spear_jax.model.tokenizer.Tokenizer``)."""
    if tokenizer is None:
        tokenizer = HFTokenizer(small_bpe(), eos_token=IM_END, pad_token="<pad>")
    return TemplateChatTokenizer(ChatTemplate(tokenizer, "chatml"))


def fixed_logprobs(n: int, offset: float = 0.0) -> np.ndarray:
    """The scripted behaviour logprobs of an ``n``-token generation: -0.1, -0.2, ... (+offset)."""
    return (-0.1 * np.arange(1, n + 1) + offset).astype(np.float32)


class ScriptedSampler:
    """Emits ``policy(decoded context)`` as tokens (module docstring). Records every call."""

    def __init__(self, tokenizer: TemplateChatTokenizer, policy: Callable[[str], str]):
        self.tokenizer, self.policy = tokenizer, policy
        self.calls: list[int] = []  # batch size of each call
        self.turn_limits: list[list[int] | None] = []  # sessions: live rows' token caps per call

    def emit(self, context: Sequence[int], sampling, limit: int | None = None) -> Generation:
        text = self.policy(self.tokenizer.tokenizer.decode(list(context), skip_special=False))
        tokens = self.tokenizer.encode(text) + list(self.tokenizer.assistant_end_ids)
        finish = "stop"
        cap = sampling.max_new_tokens if limit is None else min(sampling.max_new_tokens, limit)
        if len(tokens) > cap:
            tokens, finish = tokens[:cap], "length"
        tokens = np.asarray(tokens, dtype=np.int32)
        return Generation(tokens=tokens, logprobs=fixed_logprobs(len(tokens)), finish_reason=finish)

    def generate(self, prompts, sampling, key):
        self.calls.append(len(prompts))
        return [self.emit(p, sampling) for p in prompts]

    def start_session(self, batch_size: int) -> "ScriptedSession":
        return ScriptedSession(self, batch_size)


class ScriptedSession:
    """Per-row token history; ``extend_and_generate`` follows the sampler contract."""

    def __init__(self, sampler: ScriptedSampler, batch_size: int):
        self.sampler = sampler
        self.history: list[list[int]] = [[] for _ in range(batch_size)]

    def extend_and_generate(self, new_tokens, sampling, key, max_new_tokens=None):
        if len(new_tokens) != len(self.history):
            raise ValueError("new_tokens must have one entry per session row")
        self.sampler.calls.append(sum(t is not None for t in new_tokens))
        self.sampler.turn_limits.append(None if max_new_tokens is None else [
            int(m) for t, m in zip(new_tokens, max_new_tokens) if t is not None])
        out = []
        for b, tokens in enumerate(new_tokens):
            if tokens is None:
                out.append(None)
                continue
            self.history[b].extend(int(t) for t in tokens)
            generation = self.sampler.emit(self.history[b], sampling,
                                           None if max_new_tokens is None else int(max_new_tokens[b]))
            self.history[b].extend(int(t) for t in generation.tokens)
            out.append(generation)
        return out

    def lengths(self) -> np.ndarray:
        return np.asarray([len(h) for h in self.history], dtype=np.int32)


SAY_NUMBER_STYLE = AgentPromptStyle(intro="You are an expert agent.")


def numbers_of_task(task_id: int, length: int) -> list[int]:
    return [int(n) for n in np.random.default_rng(task_id).integers(0, 100, size=length)]


class SayNumberEnv:
    """Shows a number each step; the right action is ``say <number>`` (reward 1).

    Task ``t`` shows ``numbers_of_task(t, episode_length)``; the episode ends after them
    (won = every step right) or after ``max_steps``. ``fail_on_reset`` / ``fail_at_step``
    make it raise, to test isolation; ``hang_at_step`` makes that step sleep ``hang_s`` seconds
    first (a hung environment).
    """

    name = "say_number"
    domain = "agent"
    prompt_style = SAY_NUMBER_STYLE
    task_ids = range(1000)  # any int seeds a task

    def __init__(self, episode_length: int = 3, max_steps: int = 10, fail_on_reset: bool = False,
                 fail_at_step: int | None = None, tool_observations: bool = False,
                 hang_at_step: int | None = None, hang_s: float = 60.0):
        self.episode_length, self.max_steps = episode_length, max_steps
        self.hang_at_step, self.hang_s = hang_at_step, hang_s
        self.fail_on_reset, self.fail_at_step = fail_on_reset, fail_at_step
        self.tool_observations = tool_observations

    def _observation(self) -> Observation:
        text = f"Number: {self.numbers[self.t]}"
        actions = tuple(f"say {n}" for n in sorted(set(self.numbers)))
        return Observation(text=text, task="say the number shown", admissible_actions=actions)

    def reset(self, task_id=None, seed=None) -> Observation:
        if self.fail_on_reset:
            raise RuntimeError("scripted reset failure")
        self.numbers = numbers_of_task(int(task_id), self.episode_length)
        self.t, self.correct, self.tool_calls = 0, 0, 0
        return self._observation()

    def step(self, response_text: str) -> StepResult:
        if self.fail_at_step is not None and self.t == self.fail_at_step:
            raise RuntimeError("scripted step failure")
        if self.hang_at_step is not None and self.t == self.hang_at_step:
            time.sleep(self.hang_s)
        match = re.search(r"<action>say (\d+)</action>", response_text)
        valid = match is not None and "<think>" in response_text
        right = match is not None and int(match.group(1)) == self.numbers[self.t]
        self.correct += int(right)
        self.tool_calls += int("print(" in response_text)
        self.t += 1
        done = self.t >= self.episode_length
        won = done and self.correct == self.episode_length
        observation = Observation(text="", task="say the number shown") if done else self._observation()
        return StepResult(observation=observation, reward=float(right), done=done, won=won,
                          action_valid=valid, num_tool_calls=self.tool_calls, incomplete=done and not right)

    def close(self) -> None:
        pass


def say_number_policy(context: str, wrong_on: Callable[[int], bool] = lambda n: False) -> str:
    """Reads the last ``Number: n`` of the context and says it (or n+1 where ``wrong_on(n)``)."""
    n = int(re.findall(r"Number: (\d+)", context)[-1])
    said = n + 1 if wrong_on(n) else n
    return f"<think>I see {n}.</think><action>say {said}</action>"
