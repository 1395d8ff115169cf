"""Tiny random models of each family, built in memory from transformers configs."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from foresight_lab import tokenizer as ours
from foresight_lab.models.config import ModelConfig
from foresight_lab.weights.loader import LoadedModel
from foresight_lab.weights.safetensors import params_from_state_dict

VOCAB_SIZE = 320
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, the capital of France is Paris; naïve café 東京 🙂",
    "forecasts are probabilities: a 70% chance of rain tomorrow",
]

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def tiny_hf_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with VOCAB_SIZE tokens and ChatML special tokens, as transformers'."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_tokenizer() -> ours.Tokenizer:
    return ours.Tokenizer.from_transformers(tiny_hf_tokenizer())


def tiny_hf_config(family: str = "llama", **overrides) -> transformers.PretrainedConfig:
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=family == "llama",
    )
    if family == "llama":  # exercise Llama 3 rope scaling
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    if family == "qwen3":
        kwargs["head_dim"] = 32  # not hidden/heads, as in real Qwen3 models
    kwargs.update(overrides)
    return CONFIG_CLASSES[family](**kwargs)


def tiny_hf_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    model.eval()
    with torch.no_grad():  # random init leaves biases and norms trivial; make them matter
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
            elif tensor.dim() == 2:
                tensor.mul_(4.0)  # sharper logits: less flat distributions than init's
    return model


def tiny_loaded_model(family: str = "llama", seed: int = 0) -> LoadedModel:
    hf_model = tiny_hf_model(family, seed)
    config = ModelConfig.from_hf(hf_model.config)
    tokenizer = tiny_tokenizer()
    return LoadedModel(
        name=f"tiny-{family}",
        config=config,
        params=params_from_state_dict(config, hf_model.state_dict()),
        tokenizer=tokenizer,
        eos_token_ids=frozenset({tokenizer.eos_token_id}),
    )
