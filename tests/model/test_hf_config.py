"""config.json reading: shipped configs load, omitted keys take transformers' defaults (compared
with transformers' own reading of the same file), unsupported attention / RoPE / bias / activation
settings raise naming the file and the key."""
import json

import pytest

from spear_jax.model import ModelConfig, from_hf_config, get_model_config, to_hf_config
from spear_jax.model.hf_checkpoint import read_hf_config

SOURCE = "/ckpt/config.json"

QWEN25_15B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_7B_INSTRUCT = {
    **QWEN25_15B_INSTRUCT, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 131072,
    "tie_word_embeddings": False, "vocab_size": 152064,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("hf, preset", [(QWEN25_15B_INSTRUCT, "qwen2.5-1.5b"),
                                        (QWEN25_7B_INSTRUCT, "qwen2.5-7b"), (QWEN3_06B, "qwen3-0.6b")])
def test_shipped_configs_with_inert_sliding_window_keys_load(hf, preset):
    assert from_hf_config(hf) == get_model_config(preset)


def tiny_hf(architecture, **changes):
    cfg = ModelConfig(architecture=architecture, vocab_size=320, hidden_size=256, intermediate_size=112,
                      num_layers=4, num_heads=32, num_kv_heads=4, head_dim=16, rope_theta=1e6,
                      rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=256)
    return {**to_hf_config(cfg), **changes}


def raises_naming(*parts):
    return pytest.raises(ValueError, match=".*".join(parts))


# ------------------------------------------------------------------------------------------------
# sliding-window attention


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_active_sliding_window_is_rejected_by_name(architecture):
    hf = tiny_hf(architecture, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    with raises_naming(SOURCE, "sliding_window = 64", r"layers \[2, 3\]", "not implemented", "full attention"):
        from_hf_config(hf, source=SOURCE)
    with raises_naming(SOURCE, "sliding_window"):  # transformers' defaults: window 4096, from layer 28
        from_hf_config({**tiny_hf(architecture, num_hidden_layers=30, max_position_embeddings=8192),
                        "use_sliding_window": True}, source=SOURCE)


@pytest.mark.parametrize("changes", [
    dict(use_sliding_window=True, sliding_window=256, max_window_layers=0),  # window >= context
    dict(use_sliding_window=True, sliding_window=64, max_window_layers=4),  # no layer from 4 on
    dict(use_sliding_window=False, sliding_window=64, max_window_layers=0),  # window switched off
    dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),  # no window
    dict(layer_types=["full_attention"] * 4),
])
def test_inert_sliding_window_settings_load(changes):
    for architecture in ("qwen2", "qwen3"):
        assert from_hf_config(tiny_hf(architecture, **changes)) == from_hf_config(tiny_hf(architecture))


def test_llama_ignores_sliding_window_keys_like_transformers():
    hf = tiny_hf("llama", use_sliding_window=True, sliding_window=8, layer_types=["chunked"])
    assert from_hf_config(hf) == from_hf_config(tiny_hf("llama"))


@pytest.mark.parametrize("changes, parts", [
    (dict(layer_types=["full_attention"] * 3 + ["sliding_attention"]),
     ("layer_types", r"\[3\]", "use_sliding_window is false", "'full_attention'")),
    (dict(layer_types=["full_attention"] * 3 + ["sliding_attention"], use_sliding_window=True,
          sliding_window=32), ("sliding_window = 32", r"layers \[3\]")),
    (dict(layer_types=["full_attention", "chunked_attention"] * 2), ("layer_types", "chunked_attention")),
    (dict(layer_types=["full_attention"] * 3), ("layer_types has 3 entries", "num_hidden_layers = 4")),
])
def test_explicit_layer_types_are_checked(changes, parts):
    with raises_naming(SOURCE, *parts):
        from_hf_config(tiny_hf("qwen2", **changes), source=SOURCE)


# ------------------------------------------------------------------------------------------------
# variants, activation, RoPE


def test_swish_is_silu():
    assert from_hf_config(tiny_hf("qwen2", hidden_act="swish")) == from_hf_config(tiny_hf("qwen2"))
    with raises_naming(SOURCE, "hidden_act = 'gelu'"):
        from_hf_config(tiny_hf("qwen2", hidden_act="gelu"), source=SOURCE)


@pytest.mark.parametrize("architecture, key", [("llama", "attention_bias"), ("llama", "mlp_bias"),
                                               ("qwen3", "attention_bias")])
def test_unsupported_biases_are_rejected_by_name(architecture, key):
    with raises_naming(SOURCE, f"{key} = True", "bias"):
        from_hf_config(tiny_hf(architecture, **{key: True}), source=SOURCE)


def test_qwen2_ignores_attention_bias_like_transformers():
    # Qwen2 always has q/k/v biases; Qwen2Config has no attention_bias field.
    assert from_hf_config(tiny_hf("qwen2", attention_bias=False)).qkv_bias


@pytest.mark.parametrize("changes, parts", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ("rope_scaling.rope_type = 'yarn'",)),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ("rope_scaling.rope_type = 'linear'",)),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), ("rope_parameters.rope_type",)),
    (dict(partial_rotary_factor=0.5), ("partial_rotary_factor = 0.5",)),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
     ("rope_scaling.low_freq_factor is missing",)),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}),
     ("rope_parameters.full_attention", "per layer type")),
])
def test_unsupported_rope_settings_are_rejected_by_name(changes, parts):
    with raises_naming(SOURCE, *parts):
        from_hf_config(tiny_hf("llama", **changes), source=SOURCE)


def test_model_config_errors_name_the_file():
    with raises_naming(SOURCE, "num_heads .* multiple of num_kv_heads"):
        from_hf_config(tiny_hf("qwen2", num_key_value_heads=5), source=SOURCE)
    with raises_naming(SOURCE, "model_type = 'gpt2'"):
        from_hf_config({"model_type": "gpt2"}, source=SOURCE)


def test_read_hf_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf("qwen3", hidden_act="relu")))
    with raises_naming(str(tmp_path / "config.json"), "hidden_act = 'relu'"):
        read_hf_config(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# omitted keys: transformers' defaults, compared with transformers' own reading

OPTIONAL_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                 "max_position_embeddings", "hidden_act"]


def transformers_fields(directory):
    """transformers' reading of ``directory/config.json`` in ModelConfig fields, or the error."""
    transformers = pytest.importorskip("transformers")
    try:
        c = transformers.AutoConfig.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001 - strict validation rejects some nulls
        return error
    if c.rope_parameters.get("rope_theta") is None:  # kept as null, fails when the model is built
        return ValueError("rope_theta is null")
    heads = c.num_attention_heads
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_layers=c.num_hidden_layers, num_heads=heads, num_kv_heads=c.num_key_value_heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                rope_theta=float(c.rope_parameters["rope_theta"]), rms_norm_eps=c.rms_norm_eps,
                tie_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("key", OPTIONAL_KEYS)
@pytest.mark.parametrize("null", [False, True])
def test_omitted_keys_take_transformers_defaults(architecture, key, null, tmp_path):
    # An absent key takes transformers' default; a null one is read as transformers reads it
    # (derived where its config class allows null, else an error naming the file and the key).
    hf = tiny_hf(architecture)
    if null:
        hf[key] = None
    else:
        del hf[key]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    want = transformers_fields(str(tmp_path))
    if isinstance(want, Exception):
        with raises_naming(str(tmp_path / "config.json"), key):
            read_hf_config(str(tmp_path))
        return
    cfg = read_hf_config(str(tmp_path))
    assert {k: getattr(cfg, k) for k in want} == want
