"""Reads a GGUF file: config from its metadata, parameters as float32 or, for Q4_1 and
Q8_0 blocks, kept in those blocks (models.quantized) unless asked to dequantize."""

from __future__ import annotations

import mmap
import pathlib
import struct
from collections.abc import Callable

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, quants
from gguf.gguf_reader import ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

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
        raise _unreadable(path, error) from error


def read_header(path: str | pathlib.Path) -> tuple[dict, dict[str, ReaderTensor], mmap.mmap]:
    """(metadata, tensors by name, the file's mapping) of a GGUF file, the tokenizer's
    arrays skipped; each tensor's data is a view of the mapping, as gguf's reader gives.

    gguf's own reader builds a numpy view or two for every string of the metadata: for
    SmolLM2's 49152 tokens and 48900 merges, 2.3 s and about 160 MB for as long as it
    lives. This walks the same format without them (0.08 s). The tokenizer, built once
    per file (tokenizer.py), still uses gguf's reader.
    """
    try:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return (*_Header(mapped).read(), mapped)
    except (OSError, struct.error, ValueError, IndexError, UnicodeDecodeError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path, error: Exception) -> NotAModelError:
    return NotAModelError(
        f"{path} is not a readable GGUF file ({error}); pass a .gguf model file, "
        "a Hugging Face model directory, or a built-in alias"
    )


# GGUF's scalar value types as struct formats.
_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# Tensor types whose data gguf's reader gives as typed arrays; all others as bytes.
_TYPED = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Header:
    """A cursor over a GGUF file's header (version 2 or 3): metadata, then tensor infos."""

    def __init__(self, data: mmap.mmap):
        self.data, self.at = data, 0
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic number at the start")
        # The version is small: read in the wrong byte order it is not (a big-endian file).
        self.order = "<" if struct.unpack_from("<I", data, 4)[0] < 1 << 16 else ">"
        version = struct.unpack_from(self.order + "I", data, 4)[0]
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self.at = 8

    def take(self, fmt: str):
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self, keep: bool = True) -> str | None:
        length = self.take("Q")
        start, self.at = self.at, self.at + length
        return bytes(self.data[start : self.at]).decode("utf-8") if keep else None

    def value(self, kind: int, keep: bool = True):
        kind = GGUFValueType(kind)
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == GGUFValueType.STRING:
            return self.string(keep)
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = GGUFValueType(self.take("I")), self.take("Q")
        if item in _SCALARS:  # read whole, as numpy
            dtype = np.dtype(self.order + _SCALARS[item])
            values = np.frombuffer(self.data, dtype, count, self.at)
            self.at += values.nbytes
            return values.tolist() if keep else None
        values = [self.value(item, keep) for _ in range(count)]
        return values if keep else None

    def read(self) -> tuple[dict, dict[str, ReaderTensor]]:
        tensor_count, field_count = self.take("Q"), self.take("Q")
        metadata = {}
        for _ in range(field_count):
            key = self.string()
            keep = key not in _TOKENIZER_ARRAYS
            value = self.value(self.take("I"), keep)
            if keep:
                metadata[key] = value
        infos = []
        for _ in range(tensor_count):
            name = self.string()
            dims = [self.take("Q") for _ in range(self.take("I"))]
            infos.append((name, dims, GGMLQuantizationType(self.take("I")), self.take("Q")))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-self.at // alignment) * alignment
        return metadata, {info[0]: self.tensor(start, *info) for info in infos}

    def tensor(self, start: int, name: str, dims: list, kind, offset: int) -> ReaderTensor:
        """Like gguf's reader's: data in numpy's order (slowest axis first), typed or bytes."""
        block, block_bytes = GGML_QUANT_SIZES[kind]
        elements = int(np.prod(dims))
        nbytes = elements * block_bytes // block
        shape = tuple(reversed(dims))
        if kind in _TYPED:
            dtype = np.dtype(_TYPED[kind]).newbyteorder(self.order)
        else:
            dtype, shape = np.dtype(np.uint8), quant_shape_to_byte_shape(shape, kind)
        data = np.ndarray(shape, dtype, buffer=self.data, offset=start + offset)
        return ReaderTensor(
            name, kind, np.array(dims, np.uint64), elements, nbytes, start + offset, data, None
        )


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
    path: str | pathlib.Path,
    on_tensor: Callable[[str], None] | None = None,
    quantized: bool = True,
    on_header: Callable[[int], None] | None = None,
) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata) of a GGUF model file.

    quantized: keep Q4_1 and Q8_0 weights in their blocks (a QuantizedMatrix each);
    False dequantizes everything to float32 (the reference, four to seven times larger).
    on_header gets the number of tensors once the header is read (a progress bar's
    total), on_tensor each tensor's name as it is read.
    """
    metadata, tensors, mapped = read_header(path)
    if on_header is not None:
        on_header(len(tensors))
    arch = metadata.get("general.architecture")
    if "token_embd.weight" in tensors and f"{arch}.vocab_size" not in metadata:
        metadata[f"{arch}.vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(f) for f in dequantize(tensors["rope_freqs.weight"]).ravel())
        if on_tensor is not None:
            on_tensor("rope_freqs.weight")
    config = ModelConfig.from_gguf(
        metadata, has_output_weight="output.weight" in tensors, rope_freq_factors=factors
    )

    def get_tensor(name: str) -> np.ndarray | QuantizedMatrix:
        if name not in tensors:
            raise NotAModelError(f"{path} has no tensor {name!r}; is the file complete?")
        tensor = tensors[name]
        blocks = keep_blocks(tensor) if quantized else None
        result = blocks if blocks is not None else dequantize(tensor)
        _forget_pages(mapped, tensor.data_offset, tensor.n_bytes)  # the result is a copy
        return result

    params = build_params(
        config,
        get_tensor,
        "gguf",
        gguf_rope_permuted=arch in _ROPE_PERMUTED_ARCHS,
        on_tensor=on_tensor,
    )
    return config, params, metadata


def _forget_pages(mapped: mmap.mmap, start: int, length: int) -> None:
    """Takes a read range of the file's pages out of the process's resident memory (they
    stay in the OS's page cache); where madvise is missing, they go when it is unmapped."""
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        first = start - start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, start + length - first)
