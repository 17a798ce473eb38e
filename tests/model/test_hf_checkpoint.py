"""Parity with transformers (torch, fp32) on tiny random Llama / Qwen2 / Qwen3 checkpoints,
export round trip, sharded placement and loader errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.model import forward
from spear_jax.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from spear_jax.sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, rope_theta=5e5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "qwen2_untied": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False),
    "qwen2_tied": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(
        **COMMON, head_dim=24, rope_theta=1e6, tie_word_embeddings=False
    ),
}


def make_hf_model(kind, seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # perturb norms and biases away from their 1 / 0 initialisation
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 320, size=(2, 40))
MASK = np.ones((2, 40), bool)
MASK[1, 30:] = False  # right padding


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers(kind, tmp_path):
    model = make_hf_model(kind)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if kind == "qwen3" else "5GB")
    if kind == "qwen3":
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    cfg, graphdef, state = load_hf_checkpoint(str(tmp_path))
    assert cfg.architecture == kind.split("_")[0]
    got, _ = forward(graphdef, state, jnp.asarray(TOKENS), jnp.asarray(MASK))
    want = hf_logits(model, TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(got)[MASK], want[MASK], atol=1e-4, rtol=1e-4)


def test_export_round_trip_and_transformers_reads_export(tmp_path):
    model = make_hf_model("qwen2_untied", seed=1)
    model.save_pretrained(tmp_path / "orig")
    cfg, graphdef, state = load_hf_checkpoint(str(tmp_path / "orig"))
    save_hf_checkpoint(cfg, state, str(tmp_path / "export"), max_shard_bytes=60_000)
    assert os.path.isfile(tmp_path / "export" / "model.safetensors.index.json")
    cfg2, _, state2 = load_hf_checkpoint(str(tmp_path / "export"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(
        hf_logits(reloaded, TOKENS, MASK)[MASK], hf_logits(model, TOKENS, MASK)[MASK], atol=1e-6
    )


def test_loading_onto_a_mesh_places_sharded_tensors(tmp_path):
    model = make_hf_model("qwen3", seed=2)
    model.save_pretrained(tmp_path)
    mesh = make_mesh(2, 2, 2)
    cfg, graphdef, state = load_hf_checkpoint(str(tmp_path), mesh=mesh)
    q = state["blocks"]["attention"]["q_proj"].get_value()  # [layers, D, H, hd]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        got, _ = jax.jit(forward, static_argnums=0)(graphdef, state, jnp.asarray(TOKENS), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(got)[MASK], hf_logits(model, TOKENS, MASK)[MASK], atol=1e-4)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(tmp_path / "empty"))

    model = make_hf_model("qwen2_tied")
    model.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        load_hf_checkpoint(str(tmp_path / "arch"))

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(str(tmp_path / "noweights"))

    with pytest.raises(ValueError, match=r"shape mismatch for tensor 'model.layers.0.mlp.(down|gate|up)_proj.weight'"):
        load_hf_checkpoint(str(tmp_path / "ok"), intermediate_size=128)


@pytest.mark.parametrize("key, value", [("num_key_value_heads", 1), ("num_attention_heads", 8), ("head_dim", 8)])
def test_config_disagreeing_with_attention_weights_names_tensor_and_file(tmp_path, key, value):
    make_hf_model("qwen3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    file = str(tmp_path / "model.safetensors")
    tensor = r"model\.layers\.\d+\.self_attn\.\w+\.weight"
    with pytest.raises(ValueError, match=rf"shape mismatch for tensor '{tensor}' in {file}: got .*{key}={value}"):
        load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("window", [
    dict(use_sliding_window=False, sliding_window=8, max_window_layers=0),  # Qwen2.5 style: off
    dict(use_sliding_window=True, sliding_window=256, max_window_layers=0),  # >= max_position_embeddings
])
def test_inert_sliding_window_configs_give_transformers_logits(tmp_path, window):
    # The token rows are 40 long, beyond the window of 8: transformers ignores a window that
    # use_sliding_window does not switch on, and one of >= max_position_embeddings masks nothing.
    torch.manual_seed(3)
    config = transformers.Qwen2Config(**COMMON, rope_theta=1e6, **window)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    _, graphdef, state = load_hf_checkpoint(str(tmp_path))
    got, _ = forward(graphdef, state, jnp.asarray(TOKENS), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(got)[MASK], hf_logits(model, TOKENS, MASK)[MASK], atol=1e-4)


def test_active_sliding_window_checkpoint_is_rejected(tmp_path):
    config = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: sliding_window = 8.*layers \[1\]"):
        load_hf_checkpoint(str(tmp_path))
