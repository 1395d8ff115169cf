"""Tokenizers and chat templates: a model's `tokenizers` tokenizer and its chat template.

transformers builds a tokenizer once, from a GGUF file's metadata or a model directory's
files; the engine then holds a `Tokenizer`: that tokenizer's Rust backend (the
`tokenizers` library, which does the work in transformers too), its special tokens, and
its chat template, rendered with jinja2 the way transformers renders it. A GGUF's
tokenizer is saved in the cache directory and, from then on, loaded with `tokenizers`
alone: a server's process never imports transformers (about 25 MB less resident memory).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from foresight_lab.weights.gguf import open_gguf
from foresight_lab.weights.registry import cache_dir

# No model hub is reachable, and none is needed: tokenizers load from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "PyTorch was not found"

# transformers' names for a tokenizer's special tokens, in the order its all_special_ids
# lists them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """Text to token ids and back, and a conversation to a prompt by the chat template.

    The methods are transformers' names for the same things (encode, decode,
    convert_ids_to_tokens, apply_chat_template, eos_token_id, ...), with the same results.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str | None],
        chat_template: str | None = None,
        extra_special_tokens: Sequence[str] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend_tokenizer = backend
        self.special_tokens_map = {
            name: special_tokens[name]
            for name in SPECIAL_TOKEN_NAMES
            if special_tokens.get(name) is not None
        }
        self.chat_template = chat_template
        named = set(self.special_tokens_map.values())
        self._extra_special_tokens = [
            t for t in dict.fromkeys(extra_special_tokens) if t not in named
        ]
        # transformers skips its clean-up (spaces before punctuation) for BPE models.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    @classmethod
    def from_transformers(cls, tokenizer) -> Tokenizer:
        """The Tokenizer of a transformers fast tokenizer (sharing its backend)."""
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates: the one used without tools
            template = template.get("default")
        return cls(
            tokenizer.backend_tokenizer,
            {k: str(v) for k, v in tokenizer.special_tokens_map.items() if v is not None},
            template,
            tokenizer.all_special_tokens,  # the named ones are left out of the extras
            bool(tokenizer.clean_up_tokenization_spaces),
        )

    @classmethod
    def from_directory(cls, path: str | pathlib.Path) -> Tokenizer:
        """The Tokenizer a transformers fast tokenizer saved in `path` (`save_pretrained`):
        tokenizer.json, tokenizer_config.json and chat_template.jinja."""
        path = pathlib.Path(path)
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else config.get("chat_template")
        )
        if isinstance(template, list):  # named templates, as [{"name", "template"}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        return cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES},
            template,
            [_token_text(t) for t in extra],
            bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ---- tokens ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str | None] | None:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        """Ids of tokens; a token not in the vocabulary gets the unknown token's id."""
        if isinstance(tokens, str):
            found = self.backend_tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def _special(self, name: str) -> str | None:
        return self.special_tokens_map.get(name)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self._special("bos_token"))
    eos_token = property(lambda self: self._special("eos_token"))
    unk_token = property(lambda self: self._special("unk_token"))
    pad_token = property(lambda self: self._special("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    @property
    def unk_token_id(self) -> int | None:
        token = self.special_tokens_map.get("unk_token")
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    # ---- chat -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        """The prompt the chat template makes of `messages` (keys whose value is None are
        left out, as transformers does); its token ids if `tokenize`. Raises ValueError
        when the model has no template, jinja2.TemplateError when the template refuses
        the messages (its `raise_exception`)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        text = _compiled_template(self.chat_template).render(
            **self.special_tokens_map,
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(token: str | dict | None) -> str | None:
    """A special token as a tokenizer_config.json holds it: text, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def _clean_up_spaces(text: str) -> str:
    """transformers' clean-up of decoded text: no space before punctuation and
    contractions (only for tokenizers whose config asks for it, none of them BPE)."""
    for spaced in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(spaced, spaced.lstrip())
    return text


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which marks an assistant's reply for
    training masks in some templates, renders what it encloses."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore-prefixed names: a template comes with a
    model file, so it is untrusted code, kept from CPython's internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja2's own tojson, HTML characters stay as they are, as in transformers.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compiled_template(source: str) -> jinja2.Template:
    """A chat template compiled in the environment transformers renders templates in: a
    sandbox, blocks trimmed, loop controls, and its raise_exception, strftime_now and
    tojson."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda format: datetime.datetime.now().strftime(format),
        namespace=_Namespace,
    )
    return environment.from_string(source)


def _transformers():
    """transformers, imported only to build a tokenizer (it costs about 20 MB resident)."""
    import transformers

    return transformers


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer stored with a model: in a GGUF file's metadata, or beside config.json.

    Building a tokenizer from GGUF metadata takes seconds and transformers, so the result
    is saved in the cache directory, keyed by the file's path, size and modification time
    and transformers' version, and loaded from there, without transformers, next time. A
    model directory's tokenizer is loaded by transformers, which knows its class's ways.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return Tokenizer.from_transformers(
            _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        )
    saved = _saved_tokenizer_dir(path)
    if (saved / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_directory(saved)
        except Exception:  # an unreadable saved copy is rebuilt below
            shutil.rmtree(saved, ignore_errors=True)
    tokenizer = tokenizer_from_gguf(path)
    _save_atomically(tokenizer, saved)
    return Tokenizer.from_transformers(tokenizer)


def tokenizer_from_gguf(path: pathlib.Path):
    """Builds the transformers tokenizer a GGUF file describes, with its GGUF converters.

    transformers' own `from_pretrained(gguf_file=...)` reads the metadata with a reader
    that imports PyTorch; this reads it with the `gguf` package instead, so PyTorch stays
    a test-only dependency. Like transformers, of the string arrays only tokens and merges
    are read in full (others become their lengths).
    """
    transformers = _transformers()
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
    version = importlib.metadata.version("transformers")
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{version}"
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


def render_chat(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> str:
    """The prompt text for a conversation, by the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model has no chat template (it is a base model); use generate() with a "
            "plain prompt instead of chat()"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
