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

import transformers  # noqa: E402

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
            return transformers.AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
        except Exception:  # an unreadable saved copy is rebuilt below
            shutil.rmtree(saved, ignore_errors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    _save_atomically(tokenizer, saved)
    return tokenizer


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
