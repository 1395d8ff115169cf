"""Tokenizers and chat templates, through `transformers`, from a GGUF file or a model directory."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

# No model hub is reachable, and none is needed: tokenizers load from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "PyTorch was not found"

import gguf  # noqa: E402
import transformers  # noqa: E402

from foresight_lab.weights.gguf import open_gguf  # noqa: E402
from foresight_lab.weights.registry import cache_dir  # noqa: E402


def load_tokenizer(path: str | pathlib.Path):
    """The tokenizer stored with a model: in a GGUF file's metadata, or beside config.json.

    Building a tokenizer from GGUF metadata takes seconds, so the result is saved in the
    cache directory, keyed by the file's path, size and modification time, and loaded
    from there next time.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    saved = _saved_tokenizer_dir(path)
    if (saved / "tokenizer_config.json").is_file():
        try:
            # The class it was saved as; AutoTokenizer would import PyTorch where it is
            # installed (about 185 MB more resident memory in a server).
            return transformers.PreTrainedTokenizerFast.from_pretrained(
                str(saved), local_files_only=True
            )
        except Exception:  # an unreadable saved copy is rebuilt below
            shutil.rmtree(saved, ignore_errors=True)
    tokenizer = tokenizer_from_gguf(path)
    _save_atomically(tokenizer, saved)
    return tokenizer


def tokenizer_from_gguf(path: pathlib.Path):
    """Builds the tokenizer a GGUF file describes, with transformers' GGUF converters.

    transformers' own `from_pretrained(gguf_file=...)` reads the metadata with a reader
    that imports PyTorch; this reads it with the `gguf` package instead, so PyTorch stays
    a test-only dependency. Like transformers, of the string arrays only tokens and merges
    are read in full (others become their lengths).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    metadata = {}
    for key, field in open_gguf(path).fields.items():
        if key == "general.architecture" or key.startswith("tokenizer."):
            strings = field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
            full = key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
            metadata[key] = len(field.data) if strings and not full else field.contents()
    groups = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, config = groups["tokenizer"], groups["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":  # sentencepiece files add BOS unless told
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _saved_tokenizer_dir(gguf_path: pathlib.Path) -> pathlib.Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{gguf_path.stem}-{digest}"


def _save_atomically(tokenizer, target: pathlib.Path) -> None:
    """A read-only or racing cache only costs speed next time, never an error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".saving-"))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(str(scratch))
        os.replace(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


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
