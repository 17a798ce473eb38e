"""The real SmolLM2-135M-Instruct GGUF: same logits and greedy continuation as transformers'
own GGUF loading."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.model import forward, init_cache
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.gguf_checkpoint import load_smollm2, smollm2_gguf_path, unpermute_rotary_rows
from spear_jax.model.tokenizer import smollm2_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_unpermute_inverts_llama_cpp_permutation():
    heads, hd, d = 3, 8, 5
    w = np.arange(heads * hd * d, dtype=np.float32).reshape(heads * hd, d)
    # llama.cpp's convert script: reshape(heads, 2, hd/2, d).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, hd // 2, d).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, heads), w)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    cfg, graphdef, state = load_smollm2()
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0

    tok = smollm2_tokenizer()
    prompt = ChatTemplate(tok, "chatml").conversation(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    ).ids
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].numpy()
        hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()

    tokens = jnp.asarray([prompt], jnp.int32)
    step = jax.jit(forward, static_argnums=0, donate_argnames=("cache",))
    cache = init_cache(cfg, 1, len(prompt) + 8)
    logits, cache = step(graphdef, state, tokens, jnp.ones_like(tokens, bool), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=2e-3, rtol=2e-3)
    greedy = []
    for _ in range(8):
        nxt = int(jnp.argmax(logits[0, -1]))
        greedy.append(nxt)
        logits, cache = step(graphdef, state, jnp.asarray([[nxt]], jnp.int32), jnp.ones((1, 1), bool), cache)
    assert greedy == hf_greedy, (tok.decode(greedy), tok.decode(hf_greedy))
