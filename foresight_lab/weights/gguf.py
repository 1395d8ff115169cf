"""Reads a GGUF file: config from its metadata, parameters as float32 or, for Q4_1 and
Q8_0 blocks, kept in those blocks (models.quantized) unless asked to dequantize."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
from gguf import quants

from foresight_lab.models.config import ModelConfig
from foresight_lab.models.quantized import QuantizedMatrix, from_gguf_blocks
from foresight_lab.weights.name_maps import build_params

# Metadata arrays that are large and only the tokenizer needs (transformers reads them itself).
_TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
}
# GGML block types kept as they are in memory, by our name for them.
_KEPT_BLOCKS = {
    gguf.GGMLQuantizationType.Q4_1: "q4_1",
    gguf.GGMLQuantizationType.Q8_0: "q8_0",
}
# llama.cpp permutes q/k rows only for these architectures.
_ROPE_PERMUTED_ARCHS = {"llama", "mistral"}


class NotAModelError(ValueError):
    """The file is not a model this project can read."""


def open_gguf(path: str | pathlib.Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the gguf package raises several types for a bad file
        raise NotAModelError(
            f"{path} is not a readable GGUF file ({error}); pass a .gguf model file, "
            "a Hugging Face model directory, or a built-in alias"
        ) from error


def read_metadata(reader: gguf.GGUFReader) -> dict:
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key not in _TOKENIZER_ARRAYS and not key.startswith("GGUF.")
    }


def dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Float32 values of one tensor, in numpy's [rows, columns] order."""
    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise NotAModelError(
            f"tensor {tensor.name} uses GGML type {tensor.tensor_type.name}, which cannot be "
            "dequantized here; re-quantize the model as Q8_0, Q4_K, Q5_K, Q6_K or F16"
        ) from error
    values = np.asarray(values, dtype=np.float32)
    # A float32 tensor comes back as a view of the file's memory map, which would keep
    # the whole file mapped, and its pages resident, for as long as the model lives.
    return values.copy() if np.may_share_memory(values, tensor.data) else values


def keep_blocks(tensor: gguf.ReaderTensor) -> QuantizedMatrix | None:
    """A 2-D tensor in a block type the engine computes with, as a QuantizedMatrix."""
    kind = _KEPT_BLOCKS.get(tensor.tensor_type)
    if kind is None or len(tensor.shape) != 2:
        return None
    columns, rows = (int(n) for n in tensor.shape)  # GGUF lists the fastest axis first
    return from_gguf_blocks(np.asarray(tensor.data), kind, (rows, columns))


def read_gguf(
    path: str | pathlib.Path, on_tensor=None, quantized: bool = True
) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata) of a GGUF model file.

    quantized: keep Q4_1 and Q8_0 weights in their blocks (a QuantizedMatrix each);
    False dequantizes everything to float32 (the reference, four to seven times larger).
    """
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    arch = metadata.get("general.architecture")
    if "token_embd.weight" in tensors and f"{arch}.vocab_size" not in metadata:
        metadata[f"{arch}.vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(f) for f in dequantize(tensors["rope_freqs.weight"]).ravel())
    config = ModelConfig.from_gguf(
        metadata, has_output_weight="output.weight" in tensors, rope_freq_factors=factors
    )

    def get_tensor(name: str) -> np.ndarray | QuantizedMatrix:
        if name not in tensors:
            raise NotAModelError(f"{path} has no tensor {name!r}; is the file complete?")
        blocks = keep_blocks(tensors[name]) if quantized else None
        return blocks if blocks is not None else dequantize(tensors[name])

    params = build_params(
        config,
        get_tensor,
        "gguf",
        gguf_rope_permuted=arch in _ROPE_PERMUTED_ARCHS,
        on_tensor=on_tensor,
    )
    return config, params, metadata


def count_tensors(path: str | pathlib.Path) -> int:
    return len(open_gguf(path).tensors)
