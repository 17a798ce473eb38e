"""Host rollout engine: many environments in lockstep, one sampler call per turn, token rows.

A rollout batch is ``num_tasks x group_size`` episodes: env ``i`` plays task ``task_ids[i //
group_size]`` and belongs to group ``i // group_size`` (the GRPO ``uid``); its trajectory id is
``i``. Every turn, the engine gathers the prompts of all live environments, calls the sampler
once for all of them, decodes the responses, steps each environment with its response text, and
drops environments whose episode ended. An environment that raises in ``reset`` or ``step`` is
isolated: its episode is marked failed (``EpisodeSummary.error``), its rows are dropped, it is
counted in ``metrics["rollout/failed_episodes"]``, and the others go on. Environments are reset
and stepped through one batched call per turn (``spear_jax.env_pool``): a list is stepped
in this process one after another, an ``EnvPool`` by worker processes concurrently, with the
same results; a worker that dies or hangs fails its episodes the same way. In a multi-process run
each process steps its block of the environments and the sampler call covers every process's
live prompts (``spear_jax.distributed``, docs/rollout.md).

Two row layouts (``RolloutConfig.layout``):

* ``"step"`` (verl-agent): one row per env step. The prompt is a single user message rendered
  afresh by ``environments.prompts.render_agent_prompt`` (task, last ``history_length``
  (observation, projected action) pairs, current observation, admissible actions; template
  ``prompt_template``), wrapped by the chat template with the assistant generation prompt; the
  response is the generated ids. The environment supplies its ``prompt_style`` (an
  ``AgentPromptStyle``: step rows need ``environments.base.AgentEnv`` environments). ``render_step_prompt`` is the one place that renders and fits these
  prompts (the supervised warm start uses it too).
* ``"trajectory"`` (ReTool-style math): one row per episode on a persistent KV-cache session.
  The first call appends the chat-rendered prompt (optional system message + the first
  observation as a user message + generation prompt); after each turn the next observation is
  appended as an ``observation_role`` message (``render_followup``: the template's tail after the
  assistant's end token, the message, the generation prompt). The row's response is every token
  after the prompt: generated tokens (loss mask 1, behaviour logprobs) interleaved with
  observation tokens (loss mask 0, logprob 0). When a turn ends without the assistant end
  sequence (cut at its token cap, or ended by another eos id / stop sequence) the end sequence
  is appended with mask 0 so the conversation stays well-formed (at the end of a row, only if the
  response budget has room for it). The whole response, model and tool tokens, takes at most
  ``max_response_length`` tokens: each turn gets what remains.

Token level throughout: generated ids are stored as produced and never re-tokenised; the text
handed to the environment is ``decode`` of the ids without the trailing end-of-turn sequence
(or eos id), with every other id written out (tags such as ``<think>`` are often special
tokens and must reach the environment).

Per-row record (``Row``): prompt/response ids, loss mask, behaviour logprobs, group id,
trajectory id, step index, env reward of the step, episode return (sum of the episode's env
rewards) and length, action validity, number of tool calls, anchor observation text and its
batch-consistent integer id (first-appearance order, so equal texts get equal ids), response
length and overlong flag (``response_length >= max_response_length``), incompleteness (agent:
no ``<action>...</action>`` after the last ``</think>``; math: the environment's
``StepResult.incomplete``), decoded response text, won flag, task type and the last step's info.
What the engine reads from an environment step travels in ``StepResult``'s typed fields
(``num_tool_calls``, ``incomplete``, ``task_type``); its ``info`` is copied onto the row unread.
Every environment must declare the batch's domain (``RolloutConfig.domain``).

The engine is written against two narrow protocols: ``ChatTokenizer`` and ``TurnSampler``
(satisfied by ``spear_jax.sampling.Sampler``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

from environments.base import DOMAINS, AgentEnv, Env, Observation, StepResult, declared_domain
from environments.prompts import DEFAULT_HISTORY_LENGTH, TEMPLATES, AgentPromptStyle, render_agent_prompt
from environments.react import has_action_after_last_think, parse_react_action
from spear_jax import distributed
from spear_jax.env_pool import EnvBatch, EnvFailure, as_batch
from spear_jax.outcomes import summarize as summarize_outcomes

LAYOUTS = ("step", "trajectory")


class ChatTokenizer(Protocol):
    """What the engine needs from a tokenizer with a chat template.

    ``render_prompt(m)`` followed by the generated assistant ids (ending with
    ``assistant_end_ids``) followed by ``render_followup(role, text)`` must equal the template's
    rendering of the whole conversation, tokenised, whenever the generated text tokenises back to
    the generated ids.
    """

    def encode(self, text: str) -> list[int]:
        """Plain text to ids (no special-token handling beyond the tokenizer's own)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text, every id written out: tag tokens (``<think>``, ``<tool_call>``) are often
        special / user-defined symbols, and the environment must see them."""
        ...

    def render_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """The conversation ``[(role, content), ...]`` and the assistant generation prompt."""
        ...

    def render_followup(self, role: str, content: str) -> list[int]:
        """What follows a closed assistant message: the template's separator after the end
        token, the message ``(role, content)`` and the assistant generation prompt."""
        ...

    @property
    def assistant_end_ids(self) -> tuple[int, ...]:
        """The id sequence that closes an assistant message (the stop sequence)."""
        ...


class TemplateChatTokenizer:
    """``ChatTokenizer`` over ``spear_jax.model.chat_template.ChatTemplate`` (chatml, llama3).

    ``render_followup`` is the template's separator after an assistant end token (the tail of a
    rendered assistant message after its stop id: ``"\\n"`` for chatml, nothing for llama3),
    then the message, then the generation prompt, so the engine's stream equals
    ``template.conversation(...)`` of the whole dialogue.
    """

    def __init__(self, template):
        self.template = template
        self.tokenizer = template.tokenizer
        closed = template.message("assistant", "").ids
        header = len(template.generation_prompt())
        if closed[header] != template.stop_id:
            raise ValueError("the chat template's empty assistant message does not end with its stop id")
        self._separator = list(closed[header + 1:])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept: the ReAct tags (<think>, <action>) are special tokens of some
        # vocabularies, and the engine strips the end-of-turn sequence itself.
        return self.tokenizer.decode(ids, skip_special=False)

    def render_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        rendered = self.template.conversation(
            [{"role": role, "content": content} for role, content in messages], add_generation_prompt=True)
        return list(rendered.ids)

    def render_followup(self, role: str, content: str) -> list[int]:
        message = self.template.message(role, content) + self.template.generation_prompt()
        return self._separator + list(message.ids)

    @property
    def assistant_end_ids(self) -> tuple[int, ...]:
        return (self.template.stop_id,)


class TurnSampler(Protocol):
    """The part of ``spear_jax.sampling.Sampler`` the engine calls."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any, key: jax.Array) -> list:
        ...

    def start_session(self, batch_size: int) -> Any:
        """A session whose ``extend_and_generate(new_tokens, sampling, key, max_new_tokens)``
        appends and decodes, row b generating at most ``max_new_tokens[b]`` tokens."""
        ...


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Options of one rollout batch.

    Attributes:
      group_size: environments per task (episodes sharing a group id).
      layout: ``"step"`` or ``"trajectory"`` rows (module docstring).
      domain: ``"agent"`` (ReAct completeness test) or ``"math"`` (the env's ``incomplete``).
      history_length: k, (observation, action) pairs shown in step-row prompts (reference 2).
      prompt_template: step rows: ``environments.prompts.TEMPLATES`` (``"verl_agent"``, the
        reference's; ``"compact"``, about half the tokens).
      max_prompt_length: step rows: a prompt longer than this many tokens is re-rendered with
        fewer history pairs (k-1, ..., 0; the reference's WebShop falls back to the no-history
        template by characters); if even the history-free prompt is longer it is cut from the
        left to this many tokens. None = never shorten.
      max_turns: sampler calls per episode at most; None = each env's ``max_steps``. An episode
        still running then is ended by the engine (``EpisodeSummary.truncated``).
      max_response_length: the overlong threshold in tokens (per generated turn for step rows,
        per whole response for trajectory rows); None = the sampling's ``max_new_tokens``
        (step rows) or ``max_sequence_length`` minus the prompt (trajectory rows). Trajectory
        rows: also the response's budget, model and tool tokens together (the reference's
        ``response_length``): each turn generates at most what remains of it (and at most
        ``max_new_tokens``), and an episode whose next observation would leave no token to
        generate ends (truncated) before it.
      max_sequence_length: trajectory rows: prompt + response tokens at most (the session's KV
        cache size), a second bound on each turn.
      system_prompt: trajectory rows: an optional system message before the first observation.
      observation_role: trajectory rows: the chat role of observations after the first.
    """

    group_size: int = 8
    layout: str = "step"
    domain: str = "agent"
    history_length: int = DEFAULT_HISTORY_LENGTH
    prompt_template: str = "verl_agent"
    max_prompt_length: int | None = None
    max_turns: int | None = None
    max_response_length: int | None = None
    max_sequence_length: int | None = None
    system_prompt: str | None = None
    observation_role: str = "tool"

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"RolloutConfig.group_size must be a positive int, got {self.group_size!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"RolloutConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"RolloutConfig.domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.history_length < 0:
            raise ValueError(f"RolloutConfig.history_length must be >= 0, got {self.history_length}")
        if self.prompt_template not in TEMPLATES:
            raise ValueError(f"RolloutConfig.prompt_template must be one of {TEMPLATES}, "
                             f"got {self.prompt_template!r}")
        for name in ("max_prompt_length", "max_turns", "max_response_length", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"RolloutConfig.{name} must be a positive int or None, got {value!r}")
        if self.layout == "trajectory" and self.max_sequence_length is None:
            raise ValueError("RolloutConfig.max_sequence_length is required for layout='trajectory' "
                             "(it is the session's KV-cache size)")


def render_step_prompt(tokenizer: ChatTokenizer, style: AgentPromptStyle, observation: Observation,
                       history: Sequence[tuple[str, str]], history_length: int, template: str,
                       max_prompt_length: int | None) -> list[int]:
    """A step row's prompt ids: the chat-wrapped ``render_agent_prompt`` with the longest history
    window k' <= ``history_length`` whose prompt fits ``max_prompt_length`` (None = no limit);
    when even the history-free prompt is longer, its last ``max_prompt_length`` ids (the
    current observation, admissible actions, instructions and generation prompt survive)."""
    for k in range(history_length, -1, -1):
        text = render_agent_prompt(style, observation, history, k, template)
        ids = tokenizer.render_prompt([("user", text)])
        if max_prompt_length is None or len(ids) <= max_prompt_length:
            return ids
    return ids[-max_prompt_length:]


@dataclasses.dataclass
class Row:
    """One training row (see the module docstring for the meaning of each field).

    Arrays: ``prompt_ids`` [P] int32; ``response_ids``, ``loss_mask`` (int8, 1 = model token),
    ``logprobs`` (float32, 0 where the mask is 0) [R].
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    group_id: int
    traj_id: int
    step_index: int
    reward: float
    action_valid: bool
    num_tool_calls: int
    anchor_obs: str
    response_text: str
    finish_reason: str
    overlong: bool
    incomplete: bool
    task_id: Any
    task_type: str
    num_turns: int = 1
    anchor_id: int = -1
    episode_return: float = 0.0
    episode_length: int = 0
    won: bool = False
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def response_length(self) -> int:
        return int(self.response_ids.shape[0])


@dataclasses.dataclass
class EpisodeSummary:
    """One episode of the batch: ``error`` is set when its environment raised."""

    group_id: int
    traj_id: int
    task_id: Any
    episode_return: float = 0.0
    length: int = 0
    won: bool = False
    truncated: bool = False
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclasses.dataclass
class RolloutResult:
    """Rows of the completed episodes, one summary per episode, and scalar metrics."""

    rows: list[Row]
    episodes: list[EpisodeSummary]
    metrics: dict[str, float]


# -- helpers ------------------------------------------------------------------------------------

def strip_suffix(ids: np.ndarray, suffix: Sequence[int]) -> np.ndarray:
    """``ids`` without a trailing ``suffix`` (unchanged when it does not end with it)."""
    n = len(suffix)
    if n and ids.shape[0] >= n and tuple(int(i) for i in ids[-n:]) == tuple(suffix):
        return ids[:-n]
    return ids


def anchor_ids(anchors: Sequence[str]) -> np.ndarray:
    """Integer ids for anchor texts: equal texts get equal ids, numbered by first appearance."""
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(a, len(table)) for a in anchors], dtype=np.int64)


def is_incomplete(domain: str, response_text: str, result: StepResult) -> bool:
    """Dr.BoT's incompleteness: agent = no action after the last ``</think>``; math = the env's
    verdict on the final answer (``result.incomplete``)."""
    if domain == "agent":
        return not has_action_after_last_think(response_text)
    return bool(result.incomplete)


def task_type_of(env: Env, result: StepResult) -> str:
    """The task type the step reports (ALFWorld), else the env's name."""
    return env.name if result.task_type is None else str(result.task_type)


def _check_inputs(envs: EnvBatch, task_ids: Sequence[Any], config: RolloutConfig) -> None:
    if len(task_ids) == 0:
        raise ValueError("task_ids is empty")
    if len(envs) != len(task_ids) * config.group_size:
        raise ValueError(
            f"envs has {len(envs)} environments; expected len(task_ids) x group_size = "
            f"{len(task_ids)} x {config.group_size} = {len(task_ids) * config.group_size}"
        )
    for i in getattr(envs, "owned", range(len(envs))):  # a process checks the environments it holds
        env = envs[i]
        domain = declared_domain(type(env))
        if domain != config.domain:
            raise ValueError(f"envs[{i}] ({type(env).__name__}) declares domain = {domain!r}; the "
                             f"batch's RolloutConfig.domain is {config.domain!r}")
        if config.layout == "step" and not isinstance(env, AgentEnv):
            raise TypeError(f"envs[{i}] ({type(env).__name__}) is not an environments.base.AgentEnv: "
                            "step rows render prompts with its prompt_style (an AgentPromptStyle), "
                            "besides the Env members (name, domain, max_steps, task_ids, reset, step, close)")


@dataclasses.dataclass
class _Live:
    """Host state of one running episode."""

    index: int
    observation: Observation
    anchor: str = ""
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rows: list[Row] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    won: bool = False
    # trajectory rows
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    pending: list[int] | None = None
    texts: list[str] = dataclasses.field(default_factory=list)
    invalid_turns: int = 0
    length: int = 0
    response_budget: int = 0


class RolloutEngine:
    """Runs rollout batches (module docstring).

    Args:
      sampler: ``generate`` (step rows) / ``start_session`` (trajectory rows).
      tokenizer: a ``ChatTokenizer``.
      config: batch options.
      clock: the timer used for the env / sampler time metrics.
    """

    def __init__(self, sampler: TurnSampler, tokenizer: ChatTokenizer, config: RolloutConfig,
                 clock: Callable[[], float] = time.perf_counter):
        self.sampler, self.tokenizer, self.config, self.clock = sampler, tokenizer, config, clock
        self._end_ids = tuple(int(i) for i in tokenizer.assistant_end_ids)
        if not self._end_ids:
            raise ValueError("tokenizer.assistant_end_ids is empty: the engine needs the id sequence "
                             "that ends an assistant turn")

    def run(self, envs: Sequence[Env] | EnvBatch, task_ids: Sequence[Any], sampling: Any,
            key: jax.Array) -> RolloutResult:
        """Plays ``len(task_ids) x group_size`` episodes (env ``i`` plays ``task_ids[i //
        group_size]``) and returns their rows.

        Args:
          envs: the environments, ``len(task_ids) * group_size`` of them (reset here): a list,
            stepped one after another, or a ``spear_jax.env_pool.EnvPool`` (or a slice of one),
            whose workers step each turn's environments concurrently, or this process's
            ``spear_jax.distributed.EnvShare`` of a multi-process run (it steps its block; every
            turn decodes all processes' live prompts in one lockstep call; the result holds every
            process's rows and episodes).
          task_ids: one task per group.
          sampling: the sampler's ``SamplingParams`` (passed through; ``max_new_tokens`` is read).
          key: PRNG key; turn ``t`` samples with ``fold_in(key, t)``.
        """
        config = self.config
        envs = as_batch(envs)
        _check_inputs(envs, task_ids, config)
        self._check_sampling(sampling)
        self._timers = {"env": 0.0, "sampler": 0.0}
        self._env_steps = 0
        episodes = [
            EpisodeSummary(group_id=i // config.group_size, traj_id=i, task_id=task_ids[i // config.group_size])
            for i in range(len(envs))
        ]
        requests = [(i, episodes[i].task_id) for i in getattr(envs, "owned", range(len(envs)))]
        live = [_Live(index=i, observation=observation, anchor=observation.text)
                for (i, _), observation in zip(requests, self._env_calls(envs, "reset", requests, episodes))
                if observation is not None]
        if config.layout == "step":
            finished = self._run_step_rows(envs, live, episodes, sampling, key)
        else:
            finished = self._run_trajectory_rows(envs, live, episodes, sampling, key)
        rows, episodes = self._gather(finished, episodes, requests)
        for row, anchor in zip(rows, anchor_ids([r.anchor_obs for r in rows])):
            row.anchor_id = int(anchor)
        return RolloutResult(rows=rows, episodes=episodes, metrics=self._metrics(rows, episodes))

    # -- shared ---------------------------------------------------------------------------------

    def _gather(self, finished: list[_Live], episodes: list[EpisodeSummary],
                requests: list[tuple[int, Any]]) -> tuple[list[Row], list[EpisodeSummary]]:
        """(every process's rows in episode order, every episode's summary), the same on every
        process (``spear_jax.distributed``); env steps are summed and timers the slowest's."""
        mine = ([row for state in sorted(finished, key=lambda s: s.index) for row in state.rows],
                [episodes[i] for i, _ in requests], self._env_steps, self._timers)
        parts = distributed.allgather(mine)
        self._env_steps = sum(part[2] for part in parts)
        self._timers = {name: max(part[3][name] for part in parts) for name in self._timers}
        return [row for part in parts for row in part[0]], [e for part in parts for e in part[1]]

    def _generate_lockstep(self, live: list[_Live], prompts: list[list[int]], sampling: Any,
                           key: jax.Array) -> list | None:
        """The generations of ``live``'s ``prompts``: one sampler call on every process's live
        prompts in episode order (the batch a single process would decode), so every process runs
        the same program and a row's tokens do not depend on how episodes are split. None once no
        process has a live episode."""
        everyone = sorted(pair for part in distributed.allgather([(s.index, p) for s, p in zip(live, prompts)])
                          for pair in part)
        if not everyone:
            return None
        start = self.clock()
        generations = self.sampler.generate([p for _, p in everyone], sampling, key)
        self._timers["sampler"] += self.clock() - start
        if len(generations) != len(everyone):
            raise RuntimeError(f"sampler returned {len(generations)} generations for {len(everyone)} prompts")
        by_index = {i: g for (i, _), g in zip(everyone, generations)}
        return [by_index[s.index] for s in live]

    def _env_calls(self, envs: EnvBatch, method: str, requests: Sequence[tuple[int, Any]],
                   episodes: list[EpisodeSummary]) -> list[Any]:
        """``envs.reset_batch`` / ``step_batch`` of ``requests``; an answer that is an
        ``EnvFailure`` marks its episode failed and becomes None."""
        start = self.clock()
        answers = (envs.reset_batch if method == "reset" else envs.step_batch)(requests)
        self._timers["env"] += self.clock() - start
        for (i, _), answer in zip(requests, answers):
            if isinstance(answer, EnvFailure):
                episodes[i].error = answer.error
        return [None if isinstance(answer, EnvFailure) else answer for answer in answers]

    def _check_sampling(self, sampling: Any) -> None:
        """The assistant's end sequence must end a generation, else turns run to the limit."""
        ends_turn = self._end_ids in tuple(tuple(s) for s in sampling.stop_sequences) or (
            len(self._end_ids) == 1 and self._end_ids[0] in sampling.eos_ids)
        if not ends_turn:
            raise ValueError(
                f"sampling does not stop at the assistant end sequence {self._end_ids}: add it to "
                "SamplingParams.stop_sequences (or eos_ids when it is one id)"
            )

    def _turn_limit(self, env: Env) -> int:
        return self.config.max_turns if self.config.max_turns is not None else env.max_steps

    def _decode_response(self, generation) -> str:
        """The text the environment gets: the generated ids without what ended the turn (the
        assistant end sequence, or the eos id), decoded."""
        tokens = np.asarray(generation.tokens)
        if generation.finish_reason == "eos":
            tokens = tokens[:-1]
        return self.tokenizer.decode([int(t) for t in strip_suffix(tokens, self._end_ids)])

    def _finish(self, state: _Live, episode: EpisodeSummary, truncated: bool) -> None:
        episode.episode_return = float(sum(state.rewards))
        episode.length = len(state.rewards)
        episode.won = state.won
        episode.truncated = truncated
        for row in state.rows:
            row.episode_return = episode.episode_return
            row.episode_length = episode.length
            row.won = episode.won

    # -- step rows ------------------------------------------------------------------------------

    def _step_prompt(self, env: Env, state: _Live) -> list[int]:
        config = self.config
        return render_step_prompt(self.tokenizer, env.prompt_style, state.observation, state.history,
                                  config.history_length, config.prompt_template, config.max_prompt_length)

    def _run_step_rows(self, envs, live, episodes, sampling, key) -> list[_Live]:
        config = self.config
        max_response = config.max_response_length or sampling.max_new_tokens
        finished: list[_Live] = []
        turn = 0
        while True:
            prompts = [self._step_prompt(envs[s.index], s) for s in live]
            generations = self._generate_lockstep(live, prompts, sampling, jax.random.fold_in(key, turn))
            if generations is None:
                break
            texts = [self._decode_response(generation) for generation in generations]
            results = self._env_calls(envs, "step", [(s.index, t) for s, t in zip(live, texts)], episodes)
            still_live = []
            for state, prompt, generation, text, result in zip(live, prompts, generations, texts, results):
                env, episode = envs[state.index], episodes[state.index]
                tokens = np.asarray(generation.tokens, dtype=np.int32)
                if result is None:
                    continue
                self._env_steps += 1
                state.rows.append(Row(
                    prompt_ids=np.asarray(prompt, dtype=np.int32),
                    response_ids=tokens,
                    loss_mask=np.ones(tokens.shape, dtype=np.int8),
                    logprobs=np.asarray(generation.logprobs, dtype=np.float32),
                    group_id=episode.group_id,
                    traj_id=episode.traj_id,
                    step_index=len(state.rewards),
                    reward=float(result.reward),
                    action_valid=bool(result.action_valid),
                    num_tool_calls=int(result.num_tool_calls),
                    anchor_obs=state.observation.text,
                    response_text=text,
                    finish_reason=generation.finish_reason,
                    overlong=tokens.shape[0] >= max_response,
                    incomplete=is_incomplete(config.domain, text, result),
                    task_id=episode.task_id,
                    task_type=task_type_of(env, result),
                    info=dict(result.info),
                ))
                state.history.append((state.observation.text, parse_react_action(text).action))
                state.rewards.append(float(result.reward))
                state.won = bool(result.won)
                state.observation = result.observation
                if result.done or len(state.rewards) >= self._turn_limit(env):
                    self._finish(state, episode, truncated=not result.done)
                    finished.append(state)
                else:
                    still_live.append(state)
            live = still_live
            turn += 1
        return finished

    # -- trajectory rows ------------------------------------------------------------------------

    def _start_trajectory(self, state: _Live, episode: EpisodeSummary, sampling: Any) -> None:
        """Renders the first prompt of a trajectory row and fixes its response budget."""
        config = self.config
        messages = [("user", state.observation.text)]
        if config.system_prompt is not None:
            messages.insert(0, ("system", config.system_prompt))
        state.prompt_ids = list(self.tokenizer.render_prompt(messages))
        state.pending = state.prompt_ids
        state.length = len(state.prompt_ids)
        first_turn = min(sampling.max_new_tokens, config.max_response_length or sampling.max_new_tokens)
        if state.length + first_turn > config.max_sequence_length:
            raise ValueError(
                f"the prompt of task {episode.task_id!r} has {state.length} tokens; with "
                f"max_new_tokens={first_turn} it exceeds "
                f"RolloutConfig.max_sequence_length={config.max_sequence_length}"
            )
        state.response_budget = config.max_response_length or (config.max_sequence_length - state.length)

    def _response_room(self, state: _Live) -> int:
        """Response tokens the row may still take: what remains of its response budget (model
        and tool tokens together), and of the session's sequence length."""
        response = state.length - len(state.prompt_ids)
        return min(state.response_budget - response, self.config.max_sequence_length - state.length)

    def _run_trajectory_rows(self, envs, live, episodes, sampling, key) -> list[_Live]:
        session = self.sampler.start_session(len(envs))
        for state in live:
            self._start_trajectory(state, episodes[state.index], sampling)
        finished: list[_Live] = []
        turn = 0
        while True:
            new_tokens: list[list[int] | None] = [None] * len(envs)
            turn_limits = [1] * len(envs)
            mine = [(s.index, s.pending, min(sampling.max_new_tokens, self._response_room(s))) for s in live]
            everyone = [entry for part in distributed.allgather(mine) for entry in part]
            if not everyone:
                break
            for index, pending, limit in everyone:  # the session decodes every process's rows
                new_tokens[index], turn_limits[index] = pending, limit
            start = self.clock()
            generations = session.extend_and_generate(new_tokens, sampling, jax.random.fold_in(key, turn),
                                                      max_new_tokens=turn_limits)
            self._timers["sampler"] += self.clock() - start
            texts = [self._record_turn(state, generations[state.index]) for state in live]
            results = self._env_calls(envs, "step", [(s.index, t) for s, t in zip(live, texts)], episodes)
            still_live = []
            for state, result in zip(live, results):
                if self._trajectory_turn(envs, episodes, state, result, generations[state.index]):
                    still_live.append(state)
                else:
                    finished.append(state)
            live = still_live
            turn += 1
        return [s for s in finished if s.rows]  # an env that raised leaves no row

    def _record_turn(self, state: _Live, generation) -> str:
        """Appends one generated turn (after the observation that preceded it) to a trajectory
        row; returns the text its environment is stepped with."""
        if generation is None:
            raise RuntimeError(f"session returned no generation for live row {state.index}")
        if state.texts:  # after the first turn, what was appended is an observation
            self._add_piece(state, state.pending, model=False)
        self._add_piece(state, np.asarray(generation.tokens, dtype=np.int32), model=True,
                        logprobs=generation.logprobs)
        state.texts.append(self._decode_response(generation))
        return state.texts[-1]

    def _trajectory_turn(self, envs, episodes, state: _Live, result: StepResult | None, generation) -> bool:
        """Takes the env's answer to a recorded turn of a trajectory row (None: the env failed);
        True while the episode goes on. It ends when the env is done, after ``max_turns`` turns,
        or when the next observation would leave no response token to generate (verl's agent
        loop)."""
        env, episode = envs[state.index], episodes[state.index]
        if result is None:
            return False
        tokens = np.asarray(generation.tokens, dtype=np.int32)
        self._env_steps += 1
        state.rewards.append(float(result.reward))
        state.invalid_turns += int(not result.action_valid)
        state.won = bool(result.won)
        closed = strip_suffix(tokens, self._end_ids).shape[0] < tokens.shape[0]
        closing = [] if closed else list(self._end_ids)
        if not result.done and len(state.rewards) < self._turn_limit(env):
            followup = closing + list(self.tokenizer.render_followup(
                self.config.observation_role, result.observation.text))
            if len(followup) < self._response_room(state):
                state.pending = followup
                state.length += len(followup)
                return True
        if closing and len(closing) <= self._response_room(state):
            self._add_piece(state, np.asarray(closing, dtype=np.int32), model=False)
        state.rows.append(self._trajectory_row(env, state, episode, result, generation.finish_reason))
        self._finish(state, episode, truncated=not result.done)
        return False

    def _add_piece(self, state: _Live, tokens, model: bool, logprobs=None) -> None:
        tokens = np.asarray(tokens, dtype=np.int32)
        if model:
            state.length += tokens.shape[0]
            logprobs = np.asarray(logprobs, dtype=np.float32)
        else:
            logprobs = np.zeros(tokens.shape, dtype=np.float32)
        state.pieces.append((tokens, np.full(tokens.shape, int(model), dtype=np.int8), logprobs))

    def _trajectory_row(self, env: Env, state: _Live, episode: EpisodeSummary, last: StepResult,
                        finish_reason: str) -> Row:
        config = self.config
        response = np.concatenate([p[0] for p in state.pieces])
        prompt = np.asarray(state.prompt_ids, dtype=np.int32)
        max_response = config.max_response_length or (config.max_sequence_length - prompt.shape[0])
        return Row(
            prompt_ids=prompt,
            response_ids=response,
            loss_mask=np.concatenate([p[1] for p in state.pieces]),
            logprobs=np.concatenate([p[2] for p in state.pieces]),
            group_id=episode.group_id,
            traj_id=episode.traj_id,
            step_index=0,
            reward=float(sum(state.rewards)),
            action_valid=state.invalid_turns == 0,
            num_tool_calls=int(last.num_tool_calls),
            anchor_obs=state.anchor,
            response_text="".join(state.texts),
            finish_reason=finish_reason,
            overlong=response.shape[0] >= max_response,
            incomplete=is_incomplete(config.domain, state.texts[-1], last),
            task_id=episode.task_id,
            task_type=task_type_of(env, last),
            num_turns=len(state.texts),
            info=dict(last.info),
        )

    # -- metrics --------------------------------------------------------------------------------

    def _metrics(self, rows: list[Row], episodes: list[EpisodeSummary]) -> dict[str, float]:
        outcomes = summarize_outcomes(episodes, rows)
        metrics = {
            "rollout/episodes": float(len(episodes)),
            "rollout/failed_episodes": float(len(episodes) - (outcomes.episodes if outcomes else 0)),
            "rollout/rows": float(len(rows)),
            "rollout/env_steps": float(self._env_steps),
            "rollout/env_time_s": self._timers["env"],
            "rollout/sampler_time_s": self._timers["sampler"],
        }
        if outcomes is not None:
            metrics.update({
                "rollout/success_rate": outcomes.success_rate,
                "rollout/episode_return": outcomes.episode_return,
                "rollout/episode_length": outcomes.episode_length,
                "rollout/truncated_fraction": outcomes.truncated_fraction,
            })
        if rows:
            metrics.update({
                "rollout/invalid_action_rate": float(np.mean([not r.action_valid for r in rows])),
                "rollout/response_length": float(np.mean([r.response_length for r in rows])),
                "rollout/overlong_fraction": float(np.mean([r.overlong for r in rows])),
                "rollout/incomplete_fraction": float(np.mean([r.incomplete for r in rows])),
                "rollout/tool_calls": float(np.mean([r.num_tool_calls for r in rows])),
            })
        for task_type, rate in sorted(outcomes.success_by_type.items() if outcomes else ()):
            metrics[f"rollout/success_rate/{task_type}"] = rate
        return metrics
