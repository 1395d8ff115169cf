"""Declarative maps from checkpoint tensor names to the decoder's parameter pytree.

One map per family. Each entry names a parameter path in the pytree (`/`-separated),
the tensor that fills it in a Hugging Face checkpoint and in a GGUF file (`{i}` for
the layer index), and how its layout differs from ours. A path under `layers/` holds
every layer's tensor stacked, [L, ...], in layer order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from foresight_lab.models import quantized
from foresight_lab.models.config import ModelConfig
from foresight_lab.models.quantized import QuantizedMatrix


@dataclasses.dataclass(frozen=True)
class TensorName:
    path: str  # in the parameter pytree
    hf: str  # in a Hugging Face safetensors checkpoint
    gguf: str  # in a GGUF file
    linear: bool = False  # stored [out, in]; our kernels are [in, out]
    rope_rows: str | None = None  # "q" or "k": GGUF (llama arch) interleaves these rows
    when: str | None = None  # the config switch this tensor depends on


LLAMA_FAMILY: tuple[TensorName, ...] = (
    TensorName("embed/embedding", "model.embed_tokens.weight", "token_embd.weight"),
    TensorName("final_norm/scale", "model.norm.weight", "output_norm.weight"),
    TensorName("lm_head/kernel", "lm_head.weight", "output.weight", linear=True, when="untied"),
    TensorName(
        "layers/input_norm/scale",
        "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_norm.weight",
    ),
    TensorName(
        "layers/post_attention_norm/scale",
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    *(
        TensorName(
            f"layers/attn/{p}_proj/kernel",
            f"model.layers.{{i}}.self_attn.{p}_proj.weight",
            f"blk.{{i}}.attn_{g}.weight",
            linear=True,
            rope_rows=p if p in "qk" else None,
        )
        for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
    ),
    *(
        TensorName(
            f"layers/attn/{p}_proj/bias",
            f"model.layers.{{i}}.self_attn.{p}_proj.bias",
            f"blk.{{i}}.attn_{p}.bias",
            when="attention_bias",
        )
        for p in "qkv"
    ),
    *(
        TensorName(
            f"layers/attn/{p}_norm/scale",
            f"model.layers.{{i}}.self_attn.{p}_norm.weight",
            f"blk.{{i}}.attn_{p}_norm.weight",
            when="qk_norm",
        )
        for p in "qk"
    ),
    *(
        TensorName(
            f"layers/mlp/{p}_proj/kernel",
            f"model.layers.{{i}}.mlp.{p}_proj.weight",
            f"blk.{{i}}.ffn_{p}.weight",
            linear=True,
        )
        for p in ("gate", "up", "down")
    ),
)

NAME_MAPS: dict[str, tuple[TensorName, ...]] = {
    "llama": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    "qwen3": LLAMA_FAMILY,
}


def _wanted(entry: TensorName, config: ModelConfig) -> bool:
    if entry.when is None:
        return True
    if entry.when == "untied":
        return not config.tie_word_embeddings
    return bool(getattr(config, entry.when))


def undo_gguf_rope_permutation(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two rotary halves of each head's rows of
    q and k (llama arch only); this puts them back in Hugging Face's "rotate half" order."""
    shape = rows.shape
    return (
        rows.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def build_params(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray | QuantizedMatrix],
    source: str,
    *,
    gguf_rope_permuted: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> dict:
    """The parameter pytree, filled tensor by tensor from `get_tensor(name)`.

    source is "hf" or "gguf", choosing which column of the name map is read. A tensor
    that comes as a QuantizedMatrix stays one, in [out, in] order (rows are outputs).
    """
    params: dict = {}
    for entry in NAME_MAPS[config.family]:
        if not _wanted(entry, config):
            continue
        name = getattr(entry, source)
        stacked = "{i}" in name
        names = [name.format(i=i) for i in range(config.num_layers)] if stacked else [name]
        tensors = []
        for name in names:
            tensors.append(_our_layout(entry, get_tensor(name), config, gguf_rope_permuted))
            if on_tensor is not None:
                on_tensor(name)
        node = params
        *parents, leaf = entry.path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _stack(tensors, entry.linear) if stacked else tensors[0]
    return params


def _our_layout(
    entry: TensorName,
    tensor: np.ndarray | QuantizedMatrix,
    config: ModelConfig,
    gguf_rope_permuted: bool,
) -> np.ndarray | QuantizedMatrix:
    if gguf_rope_permuted and entry.rope_rows:
        heads = config.num_heads if entry.rope_rows == "q" else config.num_kv_heads
        permute = lambda rows: np.ascontiguousarray(undo_gguf_rope_permutation(rows, heads))
        tensor = (
            tensor.map_rows(permute) if isinstance(tensor, QuantizedMatrix) else permute(tensor)
        )
    if isinstance(tensor, QuantizedMatrix):
        return tensor
    tensor = np.asarray(tensor, dtype=np.float32)
    return np.ascontiguousarray(tensor.T if entry.linear else tensor)


def _stack(
    tensors: list[np.ndarray | QuantizedMatrix], linear: bool
) -> np.ndarray | QuantizedMatrix:
    """Every layer's tensor stacked, [L, ...]. Layers kept in one block kind stay in it;
    a file that mixes kinds (or blocks and floats) across layers gets float32 for all."""
    kinds = {t.kind if isinstance(t, QuantizedMatrix) else None for t in tensors}
    if len(kinds) == 1 and None not in kinds:
        return quantized.stack(tensors)

    def as_float(t):
        if not isinstance(t, QuantizedMatrix):
            return t
        values = np.asarray(quantized.dequantize(t))
        return values.T if linear else values

    return np.stack([as_float(t) for t in tensors])
