"""The Flax decoder agrees with transformers' PyTorch implementation, family by family."""

import jax
import numpy as np
import pytest
import torch

from foresight_lab.models.config import ModelConfig
from foresight_lab.models.decoder import Decoder, empty_cache
from foresight_lab.weights.safetensors import params_from_state_dict
from tests.tiny import VOCAB_SIZE, tiny_hf_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENGTH, DECODE_STEPS, CACHE_LENGTH = 12, 8, 64


def reference_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_cached_decode_match_transformers(family):
    hf_model = tiny_hf_model(family)
    config = ModelConfig.from_hf(hf_model.config)
    params = params_from_state_dict(config, hf_model.state_dict())
    batch = 2
    tokens = np.random.RandomState(1).randint(0, VOCAB_SIZE, (batch, PROMPT_LENGTH + DECODE_STEPS))
    expected = reference_logits(hf_model, tokens)

    model = Decoder(config)
    apply = jax.jit(model.apply, static_argnames="kv_length")
    cache = empty_cache(config, batch, CACHE_LENGTH)
    positions = np.broadcast_to(np.arange(PROMPT_LENGTH), (batch, PROMPT_LENGTH))
    logits, cache = apply({"params": params}, tokens[:, :PROMPT_LENGTH], positions, cache)
    np.testing.assert_allclose(logits, expected[:, :PROMPT_LENGTH], atol=1e-4, rtol=0)

    for step in range(DECODE_STEPS):
        position = PROMPT_LENGTH + step
        column = tokens[:, position : position + 1]
        logits, cache = apply(
            {"params": params}, column, np.full((batch, 1), position), cache, kv_length=32
        )
        np.testing.assert_allclose(logits[:, 0], expected[:, position], atol=1e-4, rtol=0)


def test_config_switches_follow_the_family():
    assert ModelConfig.from_hf(tiny_hf_model("qwen2").config).attention_bias
    assert ModelConfig.from_hf(tiny_hf_model("qwen3").config).qk_norm
    llama = ModelConfig.from_hf(tiny_hf_model("llama").config)
    assert llama.tie_word_embeddings and llama.rope_scaling is not None
    assert not (llama.attention_bias or llama.qk_norm)


def test_rows_of_a_batch_do_not_see_each_other():
    hf_model = tiny_hf_model("qwen3")
    config = ModelConfig.from_hf(hf_model.config)
    params = params_from_state_dict(config, hf_model.state_dict())
    tokens = np.random.RandomState(2).randint(0, VOCAB_SIZE, (3, 10))
    positions = np.broadcast_to(np.arange(10), (3, 10))
    together, _ = Decoder(config).apply(
        {"params": params}, tokens, positions, empty_cache(config, 3, 16)
    )
    alone, _ = Decoder(config).apply(
        {"params": params}, tokens[1:2], positions[1:2], empty_cache(config, 1, 16)
    )
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5, rtol=0)
