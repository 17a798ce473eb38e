"""Scripted pieces for rollout tests: a ChatML tokenizer, a text-emitting sampler, a tiny env.

* ``ChatMLTokenizer``: a byte-level BPE (trained here on a small corpus with ``tokenizers``)
  with ChatML special tokens; ``chatml_text`` renders a whole conversation as the ChatML
  template does, so tests can tokenise the full text and compare with the engine's stream.
* ``ScriptedSampler``: ``policy(context_text) -> response text``; emits ``encode(text)`` plus the
  end token, with fixed logprobs, cut at ``max_new_tokens`` (finish ``"length"``). Its sessions
  keep each row's token history and give the policy the decoded history.
* ``SayNumberEnv``: "say the number shown"; deterministic; can be told to raise.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from environments.base import Observation, StepResult
from environments.prompts import AgentPromptStyle

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

try:
    from spear_jax.sampling import Generation, SamplingParams
except ImportError:  # the sampler is not on this branch yet: mirror its contract
    @dataclasses.dataclass(frozen=True)
    class SamplingParams:
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        greedy: bool = False
        max_new_tokens: int = 512
        stop_sequences: tuple[tuple[int, ...], ...] = ()
        eos_ids: tuple[int, ...] = ()

    @dataclasses.dataclass
    class Generation:
        tokens: np.ndarray
        logprobs: np.ndarray
        finish_reason: str


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


class ChatMLTokenizer:
    """A ``spear_jax.rollout.ChatTokenizer`` over a small byte-level BPE with ChatML."""

    def __init__(self, vocab_size: int = 600):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", IM_START, IM_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tokenizer.train_from_iterator(_CORPUS, trainer)
        self.tokenizer = tokenizer
        self.im_end = tokenizer.token_to_id(IM_END)
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids past this vocabulary (a larger model's samples) are dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        return self.encode(chatml_text(messages, add_generation_prompt=True))

    def render_followup(self, role: str, content: str) -> list[int]:
        return self.encode("\n" + chatml_text([(role, content)], add_generation_prompt=True))

    @property
    def assistant_end_ids(self) -> tuple[int, ...]:
        return (self.im_end,)


def fixed_logprobs(n: int, offset: float = 0.0) -> np.ndarray:
    """The scripted behaviour logprobs of an ``n``-token generation: -0.1, -0.2, ... (+offset)."""
    return (-0.1 * np.arange(1, n + 1) + offset).astype(np.float32)


class ScriptedSampler:
    """Emits ``policy(decoded context)`` as tokens (module docstring). Records every call."""

    def __init__(self, tokenizer: ChatMLTokenizer, policy: Callable[[str], str]):
        self.tokenizer, self.policy = tokenizer, policy
        self.calls: list[int] = []  # batch size of each call

    def emit(self, context: Sequence[int], sampling) -> Generation:
        text = self.policy(self.tokenizer.tokenizer.decode(list(context), skip_special_tokens=False))
        tokens = self.tokenizer.encode(text) + [self.tokenizer.im_end]
        finish = "stop"
        if len(tokens) > sampling.max_new_tokens:
            tokens, finish = tokens[:sampling.max_new_tokens], "length"
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

    def extend_and_generate(self, new_tokens, sampling, key):
        if len(new_tokens) != len(self.history):
            raise ValueError("new_tokens must have one entry per session row")
        self.sampler.calls.append(sum(t is not None for t in new_tokens))
        out = []
        for b, tokens in enumerate(new_tokens):
            if tokens is None:
                out.append(None)
                continue
            self.history[b].extend(int(t) for t in tokens)
            generation = self.sampler.emit(self.history[b], sampling)
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
    make it raise, to test isolation.
    """

    name = "say_number"
    prompt_style = SAY_NUMBER_STYLE

    def __init__(self, episode_length: int = 3, max_steps: int = 10, fail_on_reset: bool = False,
                 fail_at_step: int | None = None, tool_observations: bool = False):
        self.episode_length, self.max_steps = episode_length, max_steps
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
        match = re.search(r"<action>say (\d+)</action>", response_text)
        valid = match is not None and "<think>" in response_text
        right = match is not None and int(match.group(1)) == self.numbers[self.t]
        self.correct += int(right)
        self.tool_calls += int("print(" in response_text)
        self.t += 1
        done = self.t >= self.episode_length
        won = done and self.correct == self.episode_length
        observation = Observation(text="", task="say the number shown") if done else self._observation()
        info = {"num_tool_calls": self.tool_calls, "incomplete": done and not right}
        return StepResult(observation=observation, reward=float(right), done=done, won=won,
                          action_valid=valid, info=info)

    def close(self) -> None:
        pass


def say_number_policy(context: str, wrong_on: Callable[[int], bool] = lambda n: False) -> str:
    """Reads the last ``Number: n`` of the context and says it (or n+1 where ``wrong_on(n)``)."""
    n = int(re.findall(r"Number: (\d+)", context)[-1])
    said = n + 1 if wrong_on(n) else n
    return f"<think>I see {n}.</think><action>say {said}</action>"
