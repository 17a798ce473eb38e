"""Export of a run checkpoint to a Hugging Face directory, read back by transformers: logits,
shards, dtype, generation config, tokenizer files and chat template, and the errors."""
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from spear_jax.checkpoint import RunCheckpointer, RunState
from spear_jax.export import export_run, parse_size
from spear_jax.resume import config_record
from spear_jax.model import forward, get_model_config, init_model, lora
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.tokenizer import HFTokenizer, tiny_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, 4096, size=(2, 24))
MASK = np.ones((2, 24), bool)
MASK[1, 18:] = False
TEXTS = ["go north", "<|im_start|>user\nTake the key.<|im_end|>\n", "  x = 3.14 * 27\n\nÜnï ☃",
         "<think>a</think><action>open door</action>"]
MESSAGES = [{"role": "system", "content": "You play."}, {"role": "user", "content": "look"},
            {"role": "assistant", "content": "<action>look</action>"}, {"role": "tool", "content": "42"}]


def tiny_params(seed):
    """Random tiny-preset params with norms moved away from 1 (so a dropped or mis-laid norm shows)."""
    _, state = nnx.split(init_model(get_model_config("tiny"), seed=seed))
    key = jax.random.key(seed)

    def moved(path, x):  # the norms' weights, [D] or stacked [layers, D]
        return x + 0.1 * jax.random.normal(key, x.shape) if "norm" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(moved, state)


def make_run(workdir, steps=(1, 2), record_config=True, **overrides):
    """A run workdir with config.json and RL checkpoints (params + opt_state) at ``steps``,
    recording the run config as the trainer does when ``record_config``."""
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        c[section][name] = value
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        handle.write(c.to_json_best_effort(indent=2))
    checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    saved = {}
    for step in steps:
        params = tiny_params(step)
        opt_state = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.asarray(step)}
        checkpointer.save(step, RunState(device={"params": params, "opt_state": opt_state}, host={},
                                         meta={"step": step, **({"config": config_record(c)} if record_config else {})}))
        saved[step] = params
    checkpointer.close()
    return c, saved


def project_logits(params, cfg=None):
    cfg = cfg or get_model_config("tiny")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    logits, _ = forward(graphdef, params, jnp.asarray(TOKENS), jnp.asarray(MASK))
    return np.asarray(logits)


def hf_logits(directory, dtype=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK.astype(np.int64)))
    return out.logits.float().numpy()


def test_float32_export_of_a_chosen_step_gives_the_projects_logits(tmp_path):
    _, saved = make_run(tmp_path / "run")
    os.remove(tmp_path / "run" / "config.json")  # the checkpoint's own config record suffices
    summary = export_run(str(tmp_path / "run"), str(tmp_path / "out"), step=1)
    assert summary["step"] == 1
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    want = project_logits(saved[1])
    np.testing.assert_allclose(hf_logits(tmp_path / "out")[MASK], want[MASK], atol=1e-4, rtol=1e-4)
    # the newest step by default, and it differs from step 1
    export_run(str(tmp_path / "run"), str(tmp_path / "newest"))
    np.testing.assert_allclose(hf_logits(tmp_path / "newest")[MASK], project_logits(saved[2])[MASK], atol=1e-4)
    assert np.abs(want - project_logits(saved[2]))[MASK].max() > 1e-2


def test_lora_run_exports_the_merged_weights(tmp_path):
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.targets = 4, 8.0, ("q", "v", "down")
    lora_cfg, _, params = lora.add_adapters(get_model_config("tiny"), tiny_params(1), rank=4, alpha=8.0,
                                            targets=("q", "v", "down"))
    adapters, rest = nnx.split_state(params, nnx.LoRAParam, ...)
    params = nnx.merge_state(rest, jax.tree.map(lambda x: x + 0.05, adapters))  # B != 0: adapters act
    checkpointer = RunCheckpointer(str(tmp_path / "run" / "checkpoints"))
    checkpointer.save(1, RunState(device={"params": params, "opt_state": {"mu": adapters}}, host={},
                                  meta={"step": 1, "config": config_record(c)}))
    checkpointer.close()
    export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    want = project_logits(params, lora_cfg)
    np.testing.assert_allclose(hf_logits(tmp_path / "out")[MASK], want[MASK], atol=1e-4, rtol=1e-4)
    assert np.abs(want - project_logits(rest))[MASK].max() > 1e-2  # the adapters change the logits


def test_bfloat16_export_is_rounded_weights_and_within_bf16_tolerance(tmp_path):
    _, saved = make_run(tmp_path / "run", steps=(1,))
    export_run(str(tmp_path / "run"), str(tmp_path / "out"), dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), saved[1])
    got = hf_logits(tmp_path / "out")  # bf16 weights upcast to float32 by transformers
    np.testing.assert_allclose(got[MASK], project_logits(rounded)[MASK], atol=1e-4, rtol=1e-4)
    exact = project_logits(saved[1])
    scale = np.abs(exact[MASK]).max()
    np.testing.assert_allclose(got[MASK], exact[MASK], atol=2e-2 * scale)
    bf16_model = hf_logits(tmp_path / "out", dtype=torch.bfloat16)
    np.testing.assert_allclose(bf16_model[MASK], exact[MASK], atol=5e-2 * scale)


def test_sharded_export_by_the_command_line_loads_in_transformers(tmp_path):
    _, saved = make_run(tmp_path / "run", steps=(3,))
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "spear_jax.export", f"--workdir={tmp_path / 'run'}",
                    f"--out={out}", "--max_shard_size=600KB"],
                   check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=os.getcwd(), capture_output=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    assert all(os.path.getsize(out / s) <= 600_000 or len(
        [k for k, v in index["weight_map"].items() if v == s]) == 1 for s in shards)
    np.testing.assert_allclose(hf_logits(out)[MASK], project_logits(saved[3])[MASK], atol=1e-4, rtol=1e-4)


def test_tiny_sentencepiece_tokenizer_and_generation_config_load_in_transformers(tmp_path):
    c, _ = make_run(tmp_path / "run", steps=(1,))
    export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(tmp_path / "out"))
    ours = tiny_tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
    chat = ChatTemplate(ours, "chatml")
    text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == chat.render_text(MESSAGES, add_generation_prompt=True)
    assert theirs.encode(text, add_special_tokens=False) == list(chat.conversation(MESSAGES, True).ids)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == ours.token_to_id("<|im_end|>") == theirs.eos_token_id
    assert generation.pad_token_id == ours.pad_id and generation.bos_token_id == ours.bos_id
    assert generation.temperature == pytest.approx(c.rollout.eval_temperature)
    assert generation.top_p == pytest.approx(c.rollout.eval_top_p) and generation.do_sample
    assert generation.max_new_tokens == c.rollout.max_response_length


def llama3_tokenizer_json(path):
    """A small word-level tokenizer.json with the llama3 chat tokens (ids below 4096)."""
    words = ["[UNK]", "system", "user", "assistant", "ipython", "look", "go", "north", "42", "You", "play."]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.save(str(path))


def test_tokenizer_json_and_llama3_template_with_greedy_generation(tmp_path):
    llama3_tokenizer_json(tmp_path / "tokenizer.json")
    make_run(tmp_path / "run", steps=(1,), **{"model.tokenizer_path": str(tmp_path / "tokenizer.json"),
                                             "model.chat_format": "llama3", "rollout.eval_temperature": 0.0})
    export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    ours = HFTokenizer(str(tmp_path / "tokenizer.json"), eos_token="<|eot_id|>")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["go north", "You play. look 42 unknown"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    chat = ChatTemplate(ours, "llama3")
    text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == chat.render_text(MESSAGES, add_generation_prompt=True) and "ipython" in text
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.token_to_id("<|eot_id|>") and generation["do_sample"] is False
    assert "temperature" not in generation


def test_export_errors_name_the_flag(tmp_path):
    make_run(tmp_path / "run", steps=(1,), record_config=False)
    with pytest.raises(FileNotFoundError, match=r"--step=7: .*available: \[1\]"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"), step=7)
    with pytest.raises(FileNotFoundError, match="--workdir=.*no checkpoints/"):
        export_run(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    os.remove(tmp_path / "run" / "config.json")
    with pytest.raises(FileNotFoundError, match="pass --config="):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--dtype='float16'"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"), dtype="float16")


def test_parse_size_reads_transformers_units():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 << 30 and parse_size("600KB") == 600_000
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="--max_shard_size='5 parsecs'"):
        parse_size("5 parsecs")
