"""Presets carry the published dimensions (parameter counts), HF config round trip, errors."""
import pytest

from spear_jax.model import PRESETS, from_hf_config, get_model_config, to_hf_config

# Published totals (model cards), in billions, and non-embedding totals where cards give them.
PUBLISHED = {
    "smollm2-135m": (0.1345, None),
    "llama-3.2-1b": (1.24, None),
    "qwen2.5-0.5b": (0.49, 0.36),
    "qwen2.5-1.5b": (1.54, 1.31),
    "qwen2.5-7b": (7.61, 6.53),
    "qwen2.5-32b": (32.5, 31.0),
    "qwen3-0.6b": (0.6, 0.44),
    "qwen3-1.7b": (1.7, 1.4),
    "qwen3-4b": (4.0, 3.6),
    "qwen3-8b": (8.2, 6.95),
    "qwen3-32b": (32.8, 31.2),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_model_cards(name):
    cfg = get_model_config(name)
    total, non_embedding = PUBLISHED[name]
    n = cfg.num_params() / 1e9
    assert abs(n - total) / total < 0.03, (name, n, total)
    if non_embedding is not None:
        embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) / 1e9
        assert abs(n - embed - non_embedding) / non_embedding < 0.03, (name, n - embed)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = get_model_config(name)
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_transformers_style_rope_parameters_are_read():
    hf = to_hf_config(get_model_config("llama-3.2-1b"))
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**scaling, "rope_theta": hf.pop("rope_theta")}
    assert from_hf_config(hf) == get_model_config("llama-3.2-1b")


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        get_model_config("qwen9")
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        get_model_config("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="compute_dtype"):
        get_model_config("tiny", compute_dtype="float16")
    with pytest.raises(ValueError, match="architecture"):
        get_model_config("tiny", architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        from_hf_config({**to_hf_config(get_model_config("tiny")), "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_config({**to_hf_config(get_model_config("tiny")), "hidden_act": "gelu"})
