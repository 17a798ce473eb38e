"""Hugging Face ``config.json`` <-> :class:`ModelConfig`, read the way ``transformers`` reads it.

``from_hf_config(hf, source)`` takes the parsed ``config.json`` of a Llama, Qwen2 or Qwen3
checkpoint. A key the file omits (or sets to null) takes the default of transformers' config
class (``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config``), so a file transformers loads gives
the same model here; keys transformers itself requires (``model_type``, the llama3 RoPE
parameters) raise naming the file and the key. Settings this model does not implement raise
naming the file, the key and the fix instead of loading with different logits:

* ``hidden_act`` other than ``silu`` / ``swish`` (transformers maps both to SiLU);
* Llama ``attention_bias`` / ``mlp_bias`` true, Qwen3 ``attention_bias`` true;
* RoPE types other than ``default`` and ``llama3``, ``partial_rotary_factor`` != 1, RoPE
  parameters nested per layer type;
* sliding-window attention on any layer (Qwen2/Qwen3). As in transformers, the window applies only
  when ``use_sliding_window`` is true; ``layer_types``, when absent, marks layers
  ``>= max_window_layers`` as sliding. A window of at least ``max_position_embeddings`` tokens
  never masks anything within the model's context and is accepted (Qwen2.5 ships
  ``use_sliding_window: false``, so its ``sliding_window`` / ``max_window_layers`` are inert).
  Llama has no sliding window in transformers: such keys are ignored there and here.
"""
from __future__ import annotations

import dataclasses

from spear_jax.model.config import ModelConfig, RopeScaling

HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_ARCHITECTURE_NAMES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}
SILU_NAMES = ("silu", "swish")

# transformers' config-class defaults for keys a config.json may omit (None: derived, see below).
_COMMON_DEFAULTS = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, head_dim=None,
)
_QWEN_DEFAULTS = dict(
    _COMMON_DEFAULTS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
    num_key_value_heads=32, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
    attention_bias=False,
)
HF_DEFAULTS = {
    "llama": dict(_COMMON_DEFAULTS, vocab_size=32000, intermediate_size=11008,
                  max_position_embeddings=2048, num_key_value_heads=None, attention_bias=False,
                  mlp_bias=False),
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": dict(_QWEN_DEFAULTS, head_dim=128),
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


# Keys transformers' config classes let be null (a null head_dim or num_key_value_heads is derived;
# Qwen2Config has no head_dim field, its rotary embedding derives a null one).
_NULLABLE = {"llama": ("num_key_value_heads", "head_dim"),
             "qwen2": ("num_key_value_heads", "head_dim", "sliding_window"),
             "qwen3": ("num_key_value_heads", "sliding_window")}


@dataclasses.dataclass(frozen=True)
class _Reader:
    """One config.json: values with transformers' defaults, errors naming the file."""

    hf: dict
    architecture: str
    source: str

    def get(self, key: str):
        """``hf[key]``; transformers' default when absent; null only where transformers allows it."""
        if key not in self.hf:
            return HF_DEFAULTS[self.architecture][key]
        value = self.hf[key]
        if value is None and key not in _NULLABLE[self.architecture]:
            raise ValueError(f"{self.source}: {key} is null; give a value or remove the key "
                             f"(transformers' default: {HF_DEFAULTS[self.architecture][key]!r})")
        return value


def _unsupported(source: str, key: str, value, why: str, fix: str) -> ValueError:
    return ValueError(f"{source}: {key} = {value!r}: {why}; {fix}")


def _check_variant(r: _Reader) -> None:
    """Activation and bias settings this model implements (see the module docstring)."""
    act = r.get("hidden_act")
    if act not in SILU_NAMES:
        raise _unsupported(r.source, "hidden_act", act, f"unsupported hidden_act; supported: {SILU_NAMES}",
                           "this model implements the SiLU-gated MLP only")
    bias_keys = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",)}
    for key in bias_keys.get(r.architecture, ()):
        if r.get(key):
            raise _unsupported(r.source, key, r.get(key), f"unsupported {r.architecture} variant (biases on "
                               f"the {'MLP' if key == 'mlp_bias' else 'attention'} projections)",
                               "only bias-free projections are implemented (set it to false only if "
                               "the checkpoint has no such bias tensors)")


def _rope_dict(r: _Reader) -> tuple[dict, str]:
    """transformers' RoPE parameters: ``rope_scaling`` when set, else ``rope_parameters``."""
    key = "rope_scaling" if r.hf.get("rope_scaling") else "rope_parameters"
    rope = r.hf.get(key) or {}
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    if nested:
        raise _unsupported(r.source, f"{key}.{nested[0]}", rope[nested[0]], "RoPE parameters per "
                           "layer type are not implemented", f"give one {key} dict for all layers")
    return rope, key


def _rope(r: _Reader, max_positions: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None), with transformers' precedence: the RoPE dict's
    ``rope_theta`` over the top-level key over the default."""
    rope, key = _rope_dict(r)
    theta = float(rope.get("rope_theta") or r.get("rope_theta"))
    partial = rope.get("partial_rotary_factor", r.hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise _unsupported(r.source, "partial_rotary_factor", partial, "partial rotary embeddings are "
                           "not implemented", "this model rotates every head dimension")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise _unsupported(r.source, f"{key}.rope_type", rope_type, f"unsupported rope scaling type "
                           f"{rope_type!r}; supported: default, llama3", "use a checkpoint with one of those")
    missing = [k for k in _LLAMA3_KEYS if k not in rope]
    if missing:
        raise ValueError(f"{r.source}: {key}.{missing[0]} is missing; rope_type 'llama3' needs "
                         f"{', '.join(_LLAMA3_KEYS)}")
    original = r.hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    scaling = RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(original or max_positions),
    )
    return theta, scaling


def _layer_types(r: _Reader, num_layers: int) -> tuple[list, int | None]:
    """(attention type per layer, the sliding window or None) as transformers' Qwen2/Qwen3 derive
    them: the window only when ``use_sliding_window``; absent ``layer_types`` -> sliding from
    layer ``max_window_layers`` on."""
    window = r.get("sliding_window") if r.get("use_sliding_window") else None
    if r.hf.get("layer_types") is not None:
        layer_types = list(r.hf["layer_types"])
        if len(layer_types) != num_layers:
            raise ValueError(f"{r.source}: layer_types has {len(layer_types)} entries but "
                             f"num_hidden_layers = {num_layers}; give one entry per layer")
        return layer_types, window
    first_sliding = r.get("max_window_layers")
    sliding = window is not None
    return ["sliding_attention" if sliding and i >= first_sliding else "full_attention"
            for i in range(num_layers)], window


def _check_full_attention(r: _Reader, num_layers: int, max_positions: int) -> None:
    """Raise unless every layer attends to the whole causal context (see the module docstring)."""
    layer_types, window = _layer_types(r, num_layers)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise _unsupported(r.source, "layer_types", unknown, "attention types not implemented",
                           "only 'full_attention' layers are implemented")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not sliding:
        return
    layers = f"layers {sliding[:4]}{' ...' if len(sliding) > 4 else ''}"
    if window is None:
        raise _unsupported(r.source, "layer_types", f"'sliding_attention' on {layers}", "sliding layers "
                           "without a window (use_sliding_window is false or sliding_window null; "
                           "transformers rejects this too)", "mark those layers 'full_attention'")
    if window < max_positions:
        raise _unsupported(
            r.source, "sliding_window", window, f"use_sliding_window is true, so {layers} attend only "
            f"to the last {window} tokens, and sliding-window attention is not implemented here",
            f"use a checkpoint trained with full attention; setting use_sliding_window to false "
            f"gives transformers' logits only on sequences of at most {window} tokens")


def from_hf_config(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dictionary (Llama, Qwen2, Qwen3).

    ``source`` names the file in errors; ``overrides`` replace ModelConfig fields afterwards.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported architecture: model_type = {model_type!r} "
                         f"(architectures={hf.get('architectures')}); supported: {sorted(HF_MODEL_TYPES)}")
    r = _Reader(hf, HF_MODEL_TYPES[model_type], source)
    _check_variant(r)
    num_layers, max_positions = r.get("num_hidden_layers"), r.get("max_position_embeddings")
    if r.architecture != "llama":
        _check_full_attention(r, num_layers, max_positions)
    rope_theta, rope_scaling = _rope(r, max_positions)
    num_heads, hidden = r.get("num_attention_heads"), r.get("hidden_size")
    fields = dict(
        architecture=r.architecture, vocab_size=r.get("vocab_size"), hidden_size=hidden,
        intermediate_size=r.get("intermediate_size"), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=r.get("num_key_value_heads") or num_heads,
        head_dim=r.get("head_dim") or hidden // num_heads, rope_theta=rope_theta,
        rms_norm_eps=float(r.get("rms_norm_eps")), tie_embeddings=bool(r.get("tie_word_embeddings")),
        max_position_embeddings=max_positions, rope_scaling=rope_scaling,
    )
    try:
        return ModelConfig(**{**fields, **overrides})
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """Hugging Face ``config.json`` dictionary describing ``cfg`` with weights stored in ``dtype``
    (``float32`` | ``bfloat16``; the dtype transformers loads them in by default)."""
    hf = {
        "architectures": [_HF_ARCHITECTURE_NAMES[cfg.architecture]],
        "model_type": HF_MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
    }
    if cfg.architecture == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    return hf
