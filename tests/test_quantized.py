"""Weights kept in GGUF blocks: the pure-JAX reference equals the GGUF reader's floats,
and the compiled CPU kernel agrees with the reference's float32 matmul.

Tolerance of the kernel: with AVX2 it rounds each block of 32 inputs to int16 with a
scale of its own (error at most 1/65534 of the block's largest |x| per input) and sums
the integer products exactly; over K up to 1536 that moves y by at most about 2e-5 of
max |y| on these random matrices, so 1e-4 of max |y| is the bound (the float32 path
without AVX2 is within float32 rounding, far inside it).

With `activation_bits=8` (q4_1 only) each block of inputs is rounded to int8, as
llama.cpp rounds it: each input moves by at most half a step, amax / 254 of its block,
and the tests hold the result to that bound of the rounding (about 1e-3 of max |y| on
these matrices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from foresight_lab.models import cpu_kernels, quantized
from foresight_lab.models.decoder import layer_dot, transposed_dot
from foresight_lab.models.quantized import QuantizedMatrix, from_gguf_blocks

KINDS = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
KERNEL_TOLERANCE = 1e-4  # of max |y|


def random_matrix(kind: str, rows: int, columns: int, seed: int = 0):
    """(QuantizedMatrix, the GGUF reader's float32 values) of a random [rows, columns]."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((rows, columns)) * 0.05).astype(np.float32)
    blocks = quants.quantize(weights, KINDS[kind])
    reference = quants.dequantize(blocks, KINDS[kind]).astype(np.float32)
    return from_gguf_blocks(blocks, kind, (rows, columns)), reference


@pytest.mark.parametrize("kind", KINDS)
def test_the_reference_dequantizes_to_the_gguf_readers_floats_bit_for_bit(kind):
    w, expected = random_matrix(kind, 48, 96)
    assert w.shape == (48, 96)
    got = np.asarray(jax.jit(quantized.dequantize)(w))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_rows_are_the_dequantized_rows(kind):
    w, expected = random_matrix(kind, 40, 64)
    ids = jnp.asarray([[3, 0, 39], [7, 7, 1]])
    got = np.asarray(quantized.take_rows(w, ids))
    np.testing.assert_array_equal(got, expected[np.asarray(ids)])


def test_the_cpu_kernels_were_built_and_registered():
    # The package builds them at install; without them decode falls back to slow paths.
    assert cpu_kernels.available()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 13, 16, 32])
@pytest.mark.parametrize("shape", [(1536, 576), (200, 1536), (7, 64)])
def test_the_cpu_kernel_agrees_with_the_float32_reference(kind, rows, shape):
    w, dense = random_matrix(kind, *shape, seed=rows)
    x = np.random.default_rng(rows).standard_normal((rows, shape[1])).astype(np.float32)
    got = np.asarray(jax.jit(quantized.matmul)(x, w))
    expected = x @ dense.T
    assert got.shape == (rows, shape[0])
    assert np.abs(got - expected).max() <= KERNEL_TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1e3, 1e20])
def test_the_kernel_rounds_inputs_of_any_scale_and_blocks_of_zeros(kind, scale):
    # Each block of 32 inputs gets a scale of its own: tiny and huge inputs keep their
    # digits, and a block of zeros (or a row of them) gives no products.
    w, dense = random_matrix(kind, 64, 128)
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32) * scale
    x[0, 32:64] = 0  # a block of zeros
    x[1, :32] = np.float32(scale) * (np.arange(32) - 15.5)  # many values on a half step
    x[2] = 0
    got = np.asarray(jax.jit(quantized.matmul)(x, w))
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    assert np.abs(got - expected).max() <= KERNEL_TOLERANCE * np.abs(expected).max()
    assert (got[2] == 0).all()


def with_8_bits(w: QuantizedMatrix) -> QuantizedMatrix:
    return quantized.with_activation_bits({"w": w}, 8)["w"]


@pytest.mark.parametrize("rows", [1, 3, 13])
@pytest.mark.parametrize("shape", [(1536, 576), (200, 1536), (7, 64)])
def test_8_bit_activations_move_each_input_by_at_most_half_a_step(rows, shape):
    w, dense = random_matrix("q4_1", *shape, seed=rows)
    x = np.random.default_rng(rows).standard_normal((rows, shape[1])).astype(np.float32)
    got = np.asarray(jax.jit(quantized.matmul)(x, with_8_bits(w)))
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    # |x - rounded| <= amax / 254 for each input of a block, so the product moves by at
    # most the sum over blocks of amax / 254 * sum |w| (plus float32's own rounding).
    blocks = shape[1] // quantized.BLOCK
    half_step = np.abs(x).reshape(rows, blocks, -1).max(axis=2) / 254  # [rows blocks]
    weight_mass = np.abs(dense).reshape(shape[0], blocks, -1).sum(axis=2)  # [N blocks]
    bound = half_step @ weight_mass.T + 1e-5 * np.abs(expected).max()
    assert (np.abs(got - expected) <= bound).all()
    # It is the rounding of 8 bits, not 16 (whose error is about 2e-5 of max |y|).
    assert np.abs(got - expected).max() > 3 * KERNEL_TOLERANCE * np.abs(expected).max()


def test_8_bit_activations_give_a_row_the_same_bits_alone_and_in_a_batch():
    # 13 rows: groups of eight, four and one, each summed by code of its own.
    w, _ = random_matrix("q4_1", 96, 576)
    x = np.random.default_rng(4).standard_normal((13, 576)).astype(np.float32)
    run = jax.jit(quantized.matmul)
    together = np.asarray(run(x, with_8_bits(w)))
    for i in range(13):
        np.testing.assert_array_equal(np.asarray(run(x[i : i + 1], with_8_bits(w)))[0], together[i])


def test_activation_bits_apply_to_q4_1_matrices_and_other_widths_are_refused():
    q41, _ = random_matrix("q4_1", 8, 64)
    q80, _ = random_matrix("q8_0", 8, 64)
    params = quantized.with_activation_bits({"a": q41, "b": q80, "norm": np.ones(3)}, 8)
    assert (params["a"].activation_bits, params["b"].activation_bits) == (8, 16)
    x = jax.ShapeDtypeStruct((1, 64), jnp.float32)
    lowered = jax.jit(quantized.matmul).lower(x, params["a"]).as_text()
    assert f"@{quantized._TARGETS['q4_1', 8]}(" in lowered
    assert f"@{quantized._TARGETS['q4_1', 16]}(" not in lowered
    with pytest.raises(ValueError, match=r"activation_bits must be one of \(16, 8\), not 4"):
        quantized.with_activation_bits(params, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_stacked_matrix_is_read_at_the_layer_asked_for(kind, use_kernel):
    layers = [random_matrix(kind, 40, 64, seed=layer) for layer in range(3)]
    stacked = quantized.stack([w for w, _ in layers])
    assert stacked.shape == (40, 64) and stacked.values.shape[0] == 3
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    run = jax.jit(quantized.matmul, static_argnums=2)
    for layer, (w, dense) in enumerate(layers):
        got = np.asarray(run(x, stacked, use_kernel, jnp.int32(layer)))
        alone = np.asarray(run(x, w, use_kernel))
        np.testing.assert_array_equal(got, alone)  # the same sums, only read elsewhere
        assert np.abs(got - x @ dense.T).max() <= KERNEL_TOLERANCE * np.abs(got).max()


def lowered_text(x_shape, w: QuantizedMatrix, use_kernel=True) -> str:
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.jit(quantized.matmul, static_argnums=2).lower(x, w, use_kernel).as_text()


def test_decode_sized_calls_use_the_kernel_and_prefill_sized_ones_the_reference():
    w, _ = random_matrix("q4_1", 64, 64)
    target = quantized._TARGETS["q4_1", 16]
    assert target in lowered_text((4, 1, 64), w)  # 4 rows: a decode step of 4 sequences
    assert target not in lowered_text((1, quantized.KERNEL_MAX_ROWS + 1, 64), w)
    assert target not in lowered_text((4, 1, 64), w, use_kernel=False)  # e.g. on a mesh


def test_batch_dimensions_are_kept():
    w, dense = random_matrix("q8_0", 24, 64)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    got = np.asarray(quantized.matmul(x, w))
    assert got.shape == (2, 3, 24)
    np.testing.assert_allclose(got, x @ dense.T, rtol=0, atol=KERNEL_TOLERANCE * np.abs(got).max())


@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_input_gives_nan_outputs_as_the_reference_does(kind):
    w, _ = random_matrix(kind, 16, 64)
    x = np.ones((2, 64), np.float32)
    x[1, 5] = np.nan
    got = np.asarray(jax.jit(quantized.matmul)(x, w))
    assert np.isfinite(got[0]).all()
    assert np.isnan(got[1]).all()


# Float32 weights stacked over layers (Hugging Face checkpoints, quantized=False): the
# CPU kernel reads one layer's [in, out] slice in place instead of XLA copying it out.


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("shape", [(576, 1536), (64, 40)])  # (in, out); 40: a partial strip
def test_the_float_kernel_reads_the_layer_asked_for_as_the_reference_does(rows, shape):
    rng = np.random.default_rng(rows)
    kernel = rng.standard_normal((3, *shape)).astype(np.float32)
    x = rng.standard_normal((rows, shape[0])).astype(np.float32)
    run = jax.jit(layer_dot, static_argnums=3)
    for layer in range(3):
        got = np.asarray(run(x, kernel, jnp.int32(layer), True))
        expected = x @ kernel[layer]
        assert got.shape == (rows, shape[1])
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_decode_sized_float_calls_use_the_kernel_and_prefill_sized_ones_the_reference():
    kernel = jax.ShapeDtypeStruct((3, 64, 40), jnp.float32)

    def text(rows, use_kernel=True):
        x = jax.ShapeDtypeStruct((rows, 64), jnp.float32)
        run = jax.jit(layer_dot, static_argnums=3)
        return run.lower(x, kernel, jnp.int32(1), use_kernel).as_text()

    assert cpu_kernels.F32_MATMUL in text(4)
    assert cpu_kernels.F32_MATMUL not in text(quantized.KERNEL_MAX_ROWS + 1)
    assert cpu_kernels.F32_MATMUL not in text(4, use_kernel=False)


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("shape", [(300, 576), (40, 64), (7, 13)])  # (out, in); 13: a tail
def test_the_transposed_float_kernel_agrees_with_the_reference(rows, shape):
    rng = np.random.default_rng(rows)
    weights = rng.standard_normal(shape).astype(np.float32)  # a tied embedding, [out, in]
    x = rng.standard_normal((rows, shape[1])).astype(np.float32)
    got = np.asarray(jax.jit(transposed_dot)(x, weights))
    expected = x @ weights.T
    assert got.shape == (rows, shape[0])
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_row_gives_the_same_bits_alone_and_beside_other_rows():
    # XLA's dot rounds one row (a matrix-vector product) unlike several; the kernels sum
    # each row alone (the quantized one eight, four or fewer rows at a time), so
    # a decode row's logits do not depend on its batch.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((13, 576)).astype(np.float32)
    stacked = rng.standard_normal((2, 576, 200)).astype(np.float32)
    embedding = rng.standard_normal((300, 576)).astype(np.float32)
    q4_1, _ = random_matrix("q4_1", 200, 576)
    q8_0, _ = random_matrix("q8_0", 200, 576)
    for run in (
        jax.jit(lambda x: layer_dot(x, stacked, jnp.int32(1))),
        jax.jit(lambda x: layer_dot(x, stacked[0], None)),
        jax.jit(lambda x: transposed_dot(x, embedding)),
        jax.jit(lambda x: quantized.matmul(x, q4_1)),
        jax.jit(lambda x: quantized.matmul(x, q8_0)),
    ):
        together = np.asarray(run(x))
        for row in (0, 8, 12):
            np.testing.assert_array_equal(np.asarray(run(x[row : row + 1]))[0], together[row])


def test_decode_sized_transposed_calls_use_the_kernel():
    weights = jax.ShapeDtypeStruct((40, 64), jnp.float32)

    def text(rows, use_kernel=True):
        x = jax.ShapeDtypeStruct((rows, 64), jnp.float32)
        run = jax.jit(transposed_dot, static_argnums=2)
        return run.lower(x, weights, use_kernel).as_text()

    assert cpu_kernels.F32_MATMUL_TRANSPOSED in text(4)
    assert cpu_kernels.F32_MATMUL_TRANSPOSED not in text(quantized.KERNEL_MAX_ROWS + 1)
    assert cpu_kernels.F32_MATMUL_TRANSPOSED not in text(4, use_kernel=False)
