"""The shape of a Llama-family decoder, read from a Hugging Face config or GGUF metadata.

One frozen dataclass describes every member of the family; the differences between
Llama, SmolLM2, Mistral, Qwen2 and Qwen3 are switches on it, not separate classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Hugging Face `model_type` -> the switches that distinguish it.
FAMILIES: dict[str, dict[str, bool]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


class UnsupportedModelError(ValueError):
    """The weights describe an architecture this engine does not run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    # GGUF files of Llama 3.1+ store rope scaling as per-frequency divisors (rope_freqs.weight).
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any) -> ModelConfig:
        """From a `config.json` dict or a `transformers.PretrainedConfig`."""
        c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        family = c.get("model_type", "llama")
        if family not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type {family!r} is not supported; this engine runs {sorted(FAMILIES)}"
            )
        # transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        num_heads = c["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling(rope),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False))
            or FAMILIES[family].get("attention_bias", False),
            qk_norm=FAMILIES[family].get("qk_norm", False),
        )

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        *,
        has_output_weight: bool,
        rope_freq_factors: tuple[float, ...] | None = None,
    ) -> ModelConfig:
        """From GGUF key/value metadata (`{arch}.block_count` and friends)."""
        arch = metadata.get("general.architecture")
        if arch not in FAMILIES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; this engine runs {sorted(FAMILIES)}"
            )

        def get(key, default=None):
            return metadata.get(f"{arch}.{key}", default)

        hidden = get("embedding_length")
        num_heads = get("attention.head_count")
        vocab = get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        if get("rope.scaling.type") not in (None, "none"):
            raise UnsupportedModelError(
                f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported yet"
            )
        return cls(
            family=arch,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=int(num_heads),
            num_kv_heads=int(get("attention.head_count_kv") or num_heads),
            head_dim=int(get("attention.key_length") or hidden // num_heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_freq_factors=rope_freq_factors,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=FAMILIES[arch].get("attention_bias", False),
            qk_norm=FAMILIES[arch].get("qk_norm", False),
        )


def _rope_scaling(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(
            f"rope scaling {kind!r} is not supported; only 'llama3' scaling is"
        )
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
