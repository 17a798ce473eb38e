"""KV-cache sampling: prefill + an on-device decode loop, multi-turn sessions.

``Sampler(graphdef, state, config, max_len=..., max_batch=...)`` samples from independent
prompts (``generate``) or continues multi-turn rows on a persistent cache (``start_session`` ->
``Session.extend_and_generate``). See docs/sampling.md.
"""
from spear_jax.sampling.params import FINISH_REASONS, Generation, SamplingParams
from spear_jax.sampling.sampler import Sampler, Session

__all__ = ["FINISH_REASONS", "Generation", "SamplingParams", "Sampler", "Session"]
