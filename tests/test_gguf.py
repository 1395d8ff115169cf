"""The GGUF reader: a tiny model written as llama.cpp writes it reads back to the same logits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from foresight_lab.models.config import ModelConfig, UnsupportedModelError
from foresight_lab.models.decoder import Decoder, empty_cache, rope_frequencies
from foresight_lab.models.quantized import QuantizedMatrix
from foresight_lab.weights.gguf import (
    NotAModelError,
    open_gguf,
    read_gguf,
    read_header,
)
from foresight_lab.weights.name_maps import NAME_MAPS, undo_gguf_rope_permutation
from tests.tiny import VOCAB_SIZE, tiny_hf_model


def llama_cpp_permutation(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q and k rows (the reader must undo it)."""
    shape = rows.shape
    return (
        rows.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def write_gguf(path, hf_model, family: str, qtype=GGMLQuantizationType.F32, layer_qtypes=None):
    """A GGUF of hf_model; 2-D tensors in qtype, or in layer_qtypes[i] for layer i's."""
    config = ModelConfig.from_hf(hf_model.config)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    writer = GGUFWriter(str(path), family)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None:  # llama.cpp stores Llama 3 scaling as frequency divisors
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, None)
        scaled = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        writer.add_tensor("rope_freqs.weight", np.asarray(inv_freq / scaled, np.float32))
    for entry in NAME_MAPS[family]:
        layers = range(config.num_layers) if "{i}" in entry.hf else [None]
        for i in layers:
            name = entry.hf.format(i=i)
            if name not in state or (entry.when == "untied" and config.tie_word_embeddings):
                continue
            value = state[name]
            if family == "llama" and entry.rope_rows:
                heads = config.num_heads if entry.rope_rows == "q" else config.num_kv_heads
                value = llama_cpp_permutation(value, heads)
            kind = (layer_qtypes or {}).get(i, qtype)
            if value.ndim == 2 and kind != GGMLQuantizationType.F32:
                writer.add_tensor(
                    entry.gguf.format(i=i), quants.quantize(value, kind), raw_dtype=kind
                )
            else:
                writer.add_tensor(entry.gguf.format(i=i), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits_of(config, params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Decoder(config).apply(
        {"params": params}, tokens, positions, empty_cache(config, 1, 32)
    )
    return np.asarray(logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float_gguf_reads_back_to_the_same_logits(tmp_path, family):
    hf_model = tiny_hf_model(family, tie_word_embeddings=False)
    write_gguf(tmp_path / "m.gguf", hf_model, family)
    config, params, metadata = read_gguf(tmp_path / "m.gguf")
    assert config.family == family and metadata["general.architecture"] == family
    tokens = np.random.RandomState(0).randint(0, VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits_of(config, params, tokens), expected, atol=1e-4, rtol=0)


def test_the_tensor_count_comes_with_the_header_before_the_tensors(tmp_path):
    """What `load_model`'s progress bar shows: its total, then a step for each tensor
    (the Llama 3 model has rope_freqs.weight, read apart from the layers)."""
    write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), "llama")
    events = []
    read_gguf(tmp_path / "m.gguf", on_tensor=events.append, on_header=events.append)
    total, *names = events
    assert total == len(names) and sorted(names) == sorted(read_header(tmp_path / "m.gguf")[1])


@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]
)
def test_quantized_gguf_reads_back_close_to_the_float_model(tmp_path, qtype):
    hf_model = tiny_hf_model("llama", rope_parameters=None)
    write_gguf(tmp_path / "q.gguf", hf_model, "llama", qtype)
    config, params, _ = read_gguf(tmp_path / "q.gguf")
    tokens = np.random.RandomState(0).randint(0, VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    error = np.abs(logits_of(config, params, tokens) - expected).max()
    assert error < {GGMLQuantizationType.Q8_0: 0.05}.get(qtype, 0.5) * np.abs(expected).max()


def test_layers_in_different_block_kinds_are_stacked_as_float32(tmp_path):
    # Layer parameters are stacked over layers (models.decoder), which needs one block
    # kind for all of them; a file that mixes kinds gets float32 for that tensor.
    hf_model = tiny_hf_model("llama", rope_parameters=None)
    mixed = {0: GGMLQuantizationType.Q8_0}
    write_gguf(tmp_path / "m.gguf", hf_model, "llama", GGMLQuantizationType.Q4_1, mixed)
    config, params, _ = read_gguf(tmp_path / "m.gguf")
    _, float_params, _ = read_gguf(tmp_path / "m.gguf", quantized=False)
    q_proj = params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, np.ndarray) and q_proj.dtype == np.float32
    assert q_proj.shape == (
        config.num_layers,
        config.hidden_size,
        config.num_heads * config.head_dim,
    )
    np.testing.assert_array_equal(q_proj, float_params["layers"]["attn"]["q_proj"]["kernel"])
    assert isinstance(params["embed"]["embedding"], QuantizedMatrix)  # not a layer's
    # The same logits, but for the LM head (the tied embedding), which stays in Q4_1
    # blocks and runs the CPU kernel: it rounds x to int16, about 2e-5 of the scale.
    tokens = np.random.RandomState(0).randint(0, VOCAB_SIZE, (1, 10))
    expected = logits_of(config, float_params, tokens)
    error = np.abs(logits_of(config, params, tokens) - expected).max()
    assert error <= 1e-3 * np.abs(expected).max()


def test_rope_permutation_is_undone_exactly():
    rows = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    for heads in (1, 3):
        assert np.array_equal(
            undo_gguf_rope_permutation(llama_cpp_permutation(rows, heads), heads), rows
        )


def test_a_file_that_is_not_gguf_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    for read in (read_gguf, read_header):
        with pytest.raises(NotAModelError, match="not a readable GGUF file"):
            read(path)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_header_reads_as_ggufs_own_reader_reads_it(tmp_path, family):
    """Metadata (but the tokenizer's arrays), and each tensor's type, shape and data."""
    hf_model = tiny_hf_model(family, tie_word_embeddings=False)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_model, family, GGMLQuantizationType.Q8_0, {1: GGMLQuantizationType.Q4_1})
    metadata, tensors, _ = read_header(path)
    reader = open_gguf(path)
    assert metadata == {
        key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
    }
    assert len(tensors) == len(reader.tensors)
    for expected in reader.tensors:
        tensor = tensors[expected.name]
        assert (tensor.tensor_type, list(tensor.shape)) == (
            expected.tensor_type,
            list(expected.shape),
        )
        assert (tensor.n_bytes, tensor.data_offset) == (expected.n_bytes, expected.data_offset)
        assert tensor.data.dtype == expected.data.dtype
        assert np.array_equal(tensor.data, expected.data)


def test_a_truncated_header_is_refused_with_a_clear_error(tmp_path):
    hf_model = tiny_hf_model("qwen2")
    write_gguf(tmp_path / "m.gguf", hf_model, "qwen2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "m.gguf").read_bytes()[:300])
    with pytest.raises(NotAModelError, match="not a readable GGUF file"):
        read_gguf(cut)


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="not supported; this engine runs"):
        read_gguf(path)
