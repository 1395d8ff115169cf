"""Tokenizers and chat templates, through `transformers`, from a GGUF file or a model directory."""

from __future__ import annotations

import json
import os
import pathlib

# No model hub is reachable, and none is needed: tokenizers load from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402


def load_tokenizer(path: str | pathlib.Path):
    """The tokenizer stored with a model: in a GGUF file's metadata, or beside config.json."""
    path = pathlib.Path(path)
    if path.is_file():
        return transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_token_ids(
    tokenizer, path: str | pathlib.Path | None = None, metadata=None
) -> frozenset[int]:
    """Every token id that ends a generation: the tokenizer's EOS, the generation config's
    (a list in many chat models), and GGUF's end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if metadata:
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if metadata.get(key) is not None:
                ids.add(int(metadata[key]))
    if path is not None and pathlib.Path(path).is_dir():
        generation = pathlib.Path(path) / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
    return frozenset(ids)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation, by the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model has no chat template (it is a base model); use generate() with a "
            "plain prompt instead of chat()"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
