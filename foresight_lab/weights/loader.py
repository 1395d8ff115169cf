"""MODEL (alias, .gguf file or Hugging Face directory) -> LoadedModel."""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from foresight_lab.models.config import ModelConfig
from foresight_lab.progress import progress_bar
from foresight_lab.tokenizer import Tokenizer, eos_token_ids, load_tokenizer
from foresight_lab.weights import registry
from foresight_lab.weights.gguf import read_gguf
from foresight_lab.weights.safetensors import read_hf_directory


@dataclasses.dataclass
class LoadedModel:
    """Everything the engine needs from a checkpoint."""

    name: str  # the id it is served as
    config: ModelConfig
    # The decoder's parameter pytree: float32 arrays (JAX arrays on a CPU backend, numpy
    # otherwise) and QuantizedMatrix blocks.
    params: dict
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    path: pathlib.Path | None = None

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)


def load_model(
    model: str = registry.DEFAULT_MODEL, *, progress: bool | None = None, quantized: bool = True
) -> LoadedModel:
    """Resolves MODEL (fetching a built-in alias on first use) and reads its weights.

    quantized: a GGUF's Q4_1 and Q8_0 weights stay in their blocks in memory (see
    models.quantized); False dequantizes them to float32, the reference.
    """
    path = registry.resolve(str(model), progress=progress)
    if path.is_file():
        with progress_bar(desc="Loading weights", unit="tensor", progress=progress) as bar:
            config, params, metadata = read_gguf(
                path,
                on_tensor=lambda _: bar.update(),
                quantized=quantized,
                on_header=lambda total: bar.reset(total=total),
            )
    else:
        metadata = None
        with progress_bar(desc="Loading weights", unit="tensor", progress=progress) as bar:
            config, params = read_hf_directory(path, on_tensor=lambda _: bar.update())
    if jax.default_backend() == "cpu":
        # As JAX arrays, which the engine then uses where they are instead of holding a
        # second copy. Uncommitted, like every other input of the engine's functions: a
        # committed one would give them other shardings, and so other compilations.
        params = jax.device_put(params)
    tokenizer = load_tokenizer(path)
    return LoadedModel(
        name=registry.served_name(str(model)),
        config=config,
        params=params,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, path, metadata),
        path=path,
    )
