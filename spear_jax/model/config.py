"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 decoder family.

``get_model_config(name)`` returns a preset with the published dimensions; Hugging Face
``config.json`` files are read and written by :mod:`spear_jax.model.hf_config`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# LoRA target name -> the projection it adapts (``<name>_proj`` of the attention or the MLP).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Rematerialisation policies of the decoder blocks in the backward (``ModelConfig.remat``): the
# name -> the ``jax.checkpoint`` policy saying which intermediates of a block are kept; "none" runs
# no ``jax.checkpoint`` (everything is kept), "full" keeps only the block's input.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
# Parameter axes: layers (the leading axis of the stacked blocks), vocab, embed, heads, kv_heads,
# head_dim, mlp, norm.
# Activation axes: act_batch, act_length, act_embed, act_heads, act_mlp, act_vocab.
# A dimension whose size is not divisible by its mesh axes' size is replicated instead.
DEFAULT_SHARDING_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (``rope_type: llama3`` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer.

    ``param_dtype`` is the storage dtype of the parameters (float32 master weights by default);
    ``compute_dtype`` is the dtype of matmuls and activations (``"bfloat16"`` for mixed
    precision). Norm statistics, softmax, RoPE and logits are always float32.
    ``scan_layers`` runs the blocks (whose weights are always stacked along a leading
    [num_layers] axis) under one ``lax.scan``, so compile time does not grow with depth; False
    unrolls them (one traced copy per layer, same values). ``remat`` names the
    rematerialisation policy of each block in the backward (``REMAT_POLICIES``; the booleans of
    older configs map True -> "full", False -> "none"). ``attention_query_chunk`` (0 = off)
    bounds the attention scores to [B, heads, chunk, keys] by processing queries in chunks.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_query_chunk: int = 1024
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    sharding_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_SHARDING_RULES

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.attention_query_chunk < 0:
            raise ValueError(f"attention_query_chunk must be >= 0, got {self.attention_query_chunk}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        self._check_remat()
        self._check_lora()
        logical = [name for name, _ in self.sharding_rules]
        if len(set(logical)) != len(logical):
            raise ValueError(f"sharding_rules repeat a logical axis: {logical}")

    def _check_remat(self) -> None:
        if isinstance(self.remat, bool):  # the boolean field of older configs
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)} (a policy name; the former "
                             f"remat=True is 'full', remat=False is 'none'), got {self.remat!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}")

    @property
    def remat_policy(self):
        """The ``jax.checkpoint`` policy of ``remat`` (None for "none": no rematerialisation)."""
        return REMAT_POLICIES[self.remat]

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no adapters), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora_targets {unknown} are not projections; choose from {LORA_TARGETS}")
        if self.lora_rank > 0 and not self.lora_targets:
            raise ValueError(f"lora_rank = {self.lora_rank} needs at least one lora_target from {LORA_TARGETS}")

    @property
    def lora_scale(self) -> float:
        """alpha / rank: the factor of the adapters' product (0 without adapters)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def adapts(self, target: str) -> bool:
        """Whether projection ``target`` (one of ``LORA_TARGETS``) carries a LoRA adapter."""
        return self.lora_rank > 0 and target in self.lora_targets

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 has biases on the q/k/v projections."""
        return self.architecture == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises q and k per head before RoPE."""
        return self.architecture == "qwen3"

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else v * d
        return v * d + self.num_layers * block + d + head


_LLAMA3_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, ModelConfig] = {
    # Test / CPU default; vocabulary of spear_jax/model/assets/tiny_spm.model.
    "tiny": ModelConfig(
        architecture="llama", vocab_size=4096, hidden_size=128, intermediate_size=384,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=4096,
    ),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192,
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=131072,
        rope_scaling=_LLAMA3_SCALING,
    ),
    "qwen2.5-0.5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=32768,
    ),
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=False, max_position_embeddings=32768,
    ),
    "qwen2.5-32b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=32768,
    ),
    "qwen3-0.6b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-1.7b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-4b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-8b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=False, max_position_embeddings=40960,
    ),
    "qwen3-32b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
        num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=False, max_position_embeddings=40960,
    ),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """Preset by name (see ``PRESETS``), with optional field overrides
    (e.g. ``compute_dtype="bfloat16"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
