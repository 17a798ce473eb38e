"""What to sample (``SamplingParams``) and what comes back (``Generation``)."""
from __future__ import annotations

import dataclasses

import numpy as np

FINISH_REASONS = ("eos", "stop", "length")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Sampling distribution (HF / vLLM order): scale logits by 1 / temperature, keep the ``top_k``
    most likely tokens (0 = all), then keep the smallest set of most likely remaining tokens
    whose renormalised mass reaches ``top_p`` (1.0 = all), renormalise and draw. ``greedy`` takes
    the argmax instead. Generation ends right after an id in ``eos_ids``, right after the last
    token of a ``stop_sequences`` entry (only generated tokens count: a sequence that starts in
    the prompt does not end the generation), or after ``max_new_tokens`` tokens.

    Returned log-probs are log softmax(logits / temperature) at the chosen id, before the
    top-k / top-p truncation (the behaviour log-prob a policy-gradient loss recomputes).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 512
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature} (use greedy=True for argmax "
                "decoding; log-probs are then taken at this temperature)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(len(seq) == 0 for seq in self.stop_sequences):
            raise ValueError(f"stop_sequences may not contain an empty sequence: {self.stop_sequences}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if an eos id or stop-sequence id is outside [0, vocab_size)."""
        for name, ids in (("eos_ids", self.eos_ids),
                          ("stop_sequences", [t for seq in self.stop_sequences for t in seq])):
            bad = [int(t) for t in ids if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(f"{name} holds ids outside [0, {vocab_size}): {bad}")


@dataclasses.dataclass
class Generation:
    """One row's output.

    tokens: [n] int32, the generated ids, including the eos id / stop sequence that ended it.
    logprobs: [n] float32, log softmax(logits / temperature) at each generated id.
    finish_reason: "eos" | "stop" | "length".
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
