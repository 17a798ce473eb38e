"""SmolLM2-135M-Instruct (pretrained, from its GGUF): the sampler reproduces a cache-free forward,
stops on the chat end token, and continues a session without re-prefilling."""
import jax
import numpy as np
import pytest

from spear_jax.model.gguf_checkpoint import load_smollm2
from spear_jax.model.tokenizer import smollm2_tokenizer
from spear_jax.sampling import Sampler, SamplingParams
from tests.sampling.reference import log_softmax, teacher_forced_logits


@pytest.mark.slow
def test_smollm2_session_equals_full_forward():
    cfg, graphdef, state = load_smollm2()
    tok = smollm2_tokenizer()
    sampler = Sampler(graphdef, state, cfg, max_len=64, max_batch=2)
    prompts = [tok.encode("The capital of France is"), tok.encode("1, 2, 3, 4,")]
    session = sampler.start_session(2)
    end = tok.token_to_id("<|im_end|>")
    params = SamplingParams(greedy=True, max_new_tokens=8, eos_ids=(end,), stop_sequences=(tok.encode(" 6,"),))
    first = session.extend_and_generate(prompts, params, jax.random.key(0))
    assert tok.decode(first[1].tokens) == " 5, 6," and first[1].finish_reason == "stop"
    observation = tok.encode(" Next:")
    second = session.extend_and_generate([observation, None], SamplingParams(
        temperature=0.8, max_new_tokens=8), jax.random.key(1))
    assert second[1] is None
    history = prompts[0] + list(first[0].tokens) + observation
    for gen, prefix, temperature in ((first[0], prompts[0], 1.0), (first[1], prompts[1], 1.0),
                                     (second[0], history, 0.8)):
        logits = teacher_forced_logits(graphdef, state, list(prefix) + list(gen.tokens))
        at = logits[len(prefix) - 1: len(prefix) - 1 + len(gen.tokens)]
        expected = log_softmax(at, temperature)[np.arange(len(gen.tokens)), gen.tokens]
        np.testing.assert_allclose(gen.logprobs, expected, atol=1e-3)
        if temperature == 1.0:
            np.testing.assert_array_equal(gen.tokens, at.argmax(-1))
    np.testing.assert_array_equal(session.lengths(), [len(history) + len(second[0].tokens),
                                                      len(prompts[1]) + len(first[1].tokens)])
