"""GGUF dequantization, checked against slow per-block decoders written from the block layouts.

The decoders below read one block at a time with plain integer arithmetic, so that each can be
checked by eye against the format; the vectorized decoder in the gguf package (which the
project's reader uses) must agree with them value for value.
"""

import math

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from foresight_lab.weights.gguf import dequantize

F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16
BF16 = GGMLQuantizationType.BF16
Q8_0 = GGMLQuantizationType.Q8_0
Q4_0 = GGMLQuantizationType.Q4_0
Q4_1 = GGMLQuantizationType.Q4_1
Q4_K = GGMLQuantizationType.Q4_K
Q5_K = GGMLQuantizationType.Q5_K
Q6_K = GGMLQuantizationType.Q6_K

QUANTIZED_TYPES = [Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K]


# ---- scalar reference decoders -----------------------------------------------------------------


def half_to_float(bits: int) -> float:
    """IEEE binary16: 1 sign bit, 5 exponent bits (bias 15), 10 fraction bits."""
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 10) & 0x1F
    fraction = bits & 0x3FF
    if exponent == 0:  # zero or subnormal: no implicit leading 1
        return sign * fraction * 2.0**-24
    if exponent == 0x1F:
        return sign * math.inf if fraction == 0 else math.nan
    return sign * (1 + fraction / 2**10) * 2.0 ** (exponent - 15)


def bfloat16_to_float(bits: int) -> float:
    """bfloat16 is the top half of a float32: 1 sign bit, 8 exponent bits (bias 127), 7 fraction."""
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 7) & 0xFF
    fraction = bits & 0x7F
    if exponent == 0:
        return sign * fraction * 2.0**-133
    if exponent == 0xFF:
        return sign * math.inf if fraction == 0 else math.nan
    return sign * (1 + fraction / 2**7) * 2.0 ** (exponent - 127)


def half_at(block: bytes, offset: int) -> float:
    """A little-endian float16 field of a block."""
    return half_to_float(block[offset] | block[offset + 1] << 8)


def signed_byte(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def decode_q8_0(block: bytes) -> list[float]:
    """34 bytes: f16 scale d, then 32 int8 values q; value = q * d."""
    d = half_at(block, 0)
    return [signed_byte(byte) * d for byte in block[2:34]]


def decode_q4_0(block: bytes) -> list[float]:
    """18 bytes: f16 d, 16 bytes of nibbles; value = (q - 8) * d.

    byte i = [ high nibble -> output 16 + i | low nibble -> output i ]
    """
    d = half_at(block, 0)
    values = [0.0] * 32
    for i, byte in enumerate(block[2:18]):
        values[i] = ((byte & 0x0F) - 8) * d
        values[16 + i] = ((byte >> 4) - 8) * d
    return values


def decode_q4_1(block: bytes) -> list[float]:
    """20 bytes: f16 d, f16 m, 16 bytes of nibbles (laid out as in Q4_0); value = q * d + m."""
    d, m = half_at(block, 0), half_at(block, 2)
    values = [0.0] * 32
    for i, byte in enumerate(block[4:20]):
        values[i] = (byte & 0x0F) * d + m
        values[16 + i] = (byte >> 4) * d + m
    return values


def unpack_k_scales(packed: bytes) -> tuple[list[int], list[int]]:
    """The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K super-block, from its 12 packed bytes.

                 bits 7-6              bits 5-0
    byte 0..3    scale 4..7 bits 5-4   scale 0..3
    byte 4..7    min   4..7 bits 5-4   min   0..3

                 bits 7-4              bits 3-0
    byte 8..11   min   4..7 bits 3-0   scale 4..7 bits 3-0
    """
    scales, mins = [0] * 8, [0] * 8
    for j in range(4):
        scales[j] = packed[j] & 0x3F
        mins[j] = packed[4 + j] & 0x3F
        scales[4 + j] = (packed[8 + j] & 0x0F) | (packed[j] >> 6) << 4
        mins[4 + j] = (packed[8 + j] >> 4) | (packed[4 + j] >> 6) << 4
    return scales, mins


# Q4_K and Q5_K: 256 outputs = 8 sub-blocks j of 32, each with its own 6-bit (scale, min).
# The 128 nibble bytes are 4 groups of 32; group g holds sub-blocks 2g (low) and 2g + 1 (high):
#
#     nibbles[32g + i] = [ high -> output 64g + 32 + i | low -> output 64g + i ]
#
# Q5_K adds a fifth (top) bit per output: bit j of high_bits[i] belongs to output 32j + i.


def decode_q4_k(block: bytes) -> list[float]:
    """144 bytes: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.

    value = d * scale[j] * q - dmin * min[j]
    """
    d, dmin = half_at(block, 0), half_at(block, 2)
    scales, mins = unpack_k_scales(block[4:16])
    nibbles = block[16:144]
    values = []
    for n in range(256):
        j, i = divmod(n, 32)
        byte = nibbles[32 * (j // 2) + i]
        q = byte & 0x0F if j % 2 == 0 else byte >> 4
        values.append(d * scales[j] * q - dmin * mins[j])
    return values


def decode_q5_k(block: bytes) -> list[float]:
    """176 bytes: f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes of high bits, 128 of nibbles.

    value = d * scale[j] * q - dmin * min[j], q = nibble + 16 * high bit
    """
    d, dmin = half_at(block, 0), half_at(block, 2)
    scales, mins = unpack_k_scales(block[4:16])
    high_bits = block[16:48]
    nibbles = block[48:176]
    values = []
    for n in range(256):
        j, i = divmod(n, 32)
        byte = nibbles[32 * (j // 2) + i]
        q = byte & 0x0F if j % 2 == 0 else byte >> 4
        q += 16 * ((high_bits[i] >> j) & 1)
        values.append(d * scales[j] * q - dmin * mins[j])
    return values


def decode_q6_k(block: bytes) -> list[float]:
    """210 bytes: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d.

    value = d * scale[n // 16] * (q - 32), q = 6 bits. Each half h of 128 outputs is 4 quarters
    k of 32; output n = 128h + 32k + i takes
        low 4 bits:  low_nibbles[64h + 32 (k % 2) + i], low nibble for k < 2, high for k >= 2
        high 2 bits: bits 2k+1..2k of high_pairs[32h + i]
    """
    low_nibbles = block[0:128]
    high_pairs = block[128:192]
    scales = [signed_byte(byte) for byte in block[192:208]]
    d = half_at(block, 208)
    values = []
    for n in range(256):
        h, rest = divmod(n, 128)
        k, i = divmod(rest, 32)
        byte = low_nibbles[64 * h + 32 * (k % 2) + i]
        low = byte & 0x0F if k < 2 else byte >> 4
        high = (high_pairs[32 * h + i] >> (2 * k)) & 0x03
        values.append(d * scales[n // 16] * ((low | high << 4) - 32))
    return values


REFERENCE_DECODERS = {
    Q8_0: decode_q8_0,
    Q4_0: decode_q4_0,
    Q4_1: decode_q4_1,
    Q4_K: decode_q4_k,
    Q5_K: decode_q5_k,
    Q6_K: decode_q6_k,
}


def reference_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float32 values of raw blocks uint8[rows, blocks * block bytes], one block at a time."""
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = []
    for row in raw:
        data = row.tobytes()
        values = []
        for start in range(0, len(data), block_bytes):
            block_values = REFERENCE_DECODERS[qtype](data[start : start + block_bytes])
            assert len(block_values) == block_size
            values.extend(block_values)
        rows.append(values)
    # Python floats hold every product exactly, so the one rounding happens here, as in float32.
    return np.array(rows, dtype=np.float64).astype(np.float32)


# ---- helpers -----------------------------------------------------------------------------------

# Byte offsets of the float16 scale fields in each block (random bytes there could be NaN or inf).
HALF_FIELDS = {Q8_0: [0], Q4_0: [0], Q4_1: [0, 2], Q4_K: [0, 2], Q5_K: [0, 2], Q6_K: [208]}


def random_blocks(
    qtype: GGMLQuantizationType, rows: int, blocks_per_row: int, rng: np.random.Generator
) -> np.ndarray:
    """Random raw blocks uint8[rows, blocks_per_row * block bytes] with finite scales in [-1, 1]."""
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        scale = rng.uniform(-1, 1, (rows, blocks_per_row)).astype("<f2")
        raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, -1)


def write_and_read_back(path, array: np.ndarray, raw_dtype=None):
    """The one tensor of a GGUF file holding `array`, as the reader sees it."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = GGUFReader(path).tensors
    return tensor


def all_16_bit_patterns() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint32).astype("<u2")


def assert_same_floats(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal values, NaN where expected is NaN, and the same sign on zeros."""
    np.testing.assert_array_equal(actual, expected)  # counts NaN == NaN, 0.0 == -0.0
    numbers = ~np.isnan(expected)
    assert np.array_equal(np.signbit(actual[numbers]), np.signbit(expected[numbers]))


# ---- tests -------------------------------------------------------------------------------------


def test_reference_decoders_agree_with_the_ggml_block_sizes():
    for qtype, offsets in HALF_FIELDS.items():
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        assert len(REFERENCE_DECODERS[qtype](bytes(block_bytes))) == block_size
        assert max(offsets) + 2 <= block_bytes


def test_every_f16_bit_pattern_decodes_like_the_reference():
    patterns = all_16_bit_patterns()
    expected = np.array([half_to_float(int(bits)) for bits in patterns], dtype=np.float32)
    actual = quants.dequantize(patterns.view(np.uint8), F16)
    assert actual.dtype == np.float32
    assert_same_floats(actual, expected)


def test_every_bf16_bit_pattern_decodes_like_the_reference():
    patterns = all_16_bit_patterns()
    expected = np.array([bfloat16_to_float(int(bits)) for bits in patterns], dtype=np.float32)
    actual = quants.dequantize(patterns.view(np.uint8), BF16)
    assert actual.dtype == np.float32
    assert_same_floats(actual, expected)


@pytest.mark.parametrize("qtype", QUANTIZED_TYPES, ids=lambda qtype: qtype.name)
def test_quantized_blocks_decode_like_the_reference(qtype):
    raw = random_blocks(qtype, rows=3, blocks_per_row=2, rng=np.random.default_rng(qtype.value))
    actual = quants.dequantize(raw, qtype)
    # Every step is exact in float32 but the last, so the two must agree bit for bit.
    np.testing.assert_array_equal(actual, reference_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", QUANTIZED_TYPES, ids=lambda qtype: qtype.name)
def test_quantized_tensor_read_from_a_gguf_file_decodes_like_the_reference(tmp_path, qtype):
    raw = random_blocks(qtype, rows=3, blocks_per_row=2, rng=np.random.default_rng(qtype.value))
    tensor = write_and_read_back(tmp_path / "q.gguf", raw, raw_dtype=qtype)
    assert tensor.tensor_type == qtype
    values = dequantize(tensor)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    assert values.dtype == np.float32 and values.shape == (3, 2 * block_size)
    np.testing.assert_array_equal(values, reference_dequantize(raw, qtype))


def hand_built_q4_0() -> tuple[bytes, dict[int, float]]:
    block = bytearray(18)
    block[0:2] = np.float16(0.5).tobytes()
    block[2] = 0x3A  # low nibble 10 -> output 0, high nibble 3 -> output 16
    return bytes(block), {0: (10 - 8) * 0.5, 16: (3 - 8) * 0.5, 1: (0 - 8) * 0.5}


def hand_built_q4_k() -> tuple[bytes, dict[int, float]]:
    block = bytearray(144)
    block[0:2] = np.float16(1.0).tobytes()  # d
    block[2:4] = np.float16(0.25).tobytes()  # dmin
    block[4 + 1] = 0b10_000000  # scale 5 bits 5-4 = 2 (scale 1 = 0)
    block[4 + 5] = 0b01_000000  # min 5 bits 5-4 = 1 (min 1 = 0)
    block[4 + 9] = 0x73  # min 5 bits 3-0 = 7, scale 5 bits 3-0 = 3
    # Sub-block 5 is the high nibbles of group 2, so output 160 + 3 reads byte 64 + 3.
    block[16 + 64 + 3] = 0x90
    scale, minimum = 0x23, 0x17
    return bytes(block), {163: 1.0 * scale * 9 - 0.25 * minimum, 3: 0.0}


def hand_built_q6_k() -> tuple[bytes, dict[int, float]]:
    block = bytearray(210)
    # Output 200 = half 1, quarter 2, position 8: high nibble of byte 64 + 8, bits 5-4 of 32 + 8.
    block[64 + 8] = 0x50
    block[128 + 32 + 8] = 0b00_10_0000
    block[192 + 200 // 16] = 256 - 3  # int8 scale -3
    block[208:210] = np.float16(2.0).tobytes()
    return bytes(block), {200: 2.0 * -3 * ((5 | 2 << 4) - 32), 201: 2.0 * -3 * -32, 0: 0.0}


@pytest.mark.parametrize(
    ("qtype", "build"),
    [(Q4_0, hand_built_q4_0), (Q4_K, hand_built_q4_k), (Q6_K, hand_built_q6_k)],
    ids=["Q4_0", "Q4_K", "Q6_K"],
)
def test_hand_built_blocks_decode_to_the_worked_out_values(qtype, build):
    block, expected = build()
    raw = np.frombuffer(block, dtype=np.uint8).reshape(1, -1)
    for decoded in (quants.dequantize(raw, qtype)[0], reference_dequantize(raw, qtype)[0]):
        assert {n: float(decoded[n]) for n in expected} == expected


def encode_bf16(values: np.ndarray) -> tuple[np.ndarray, GGMLQuantizationType]:
    return quants.quantize(values, BF16), BF16


# How each float type is written, and its relative rounding error (half its last place).
FLOAT_ENCODINGS = {
    F32: (lambda values: (values, None), 0.0),
    F16: (lambda values: (values.astype(np.float16), None), 2.0**-11),
    BF16: (encode_bf16, 2.0**-8),
}


@pytest.mark.parametrize("qtype", [F32, F16, BF16], ids=lambda qtype: qtype.name)
def test_float_tensors_round_trip_through_a_gguf_file(tmp_path, qtype):
    encode, relative_error = FLOAT_ENCODINGS[qtype]
    rng = np.random.default_rng(0)
    # Magnitudes stay in every type's normal range, so the rounding error is relative.
    values = (rng.uniform(0.01, 100, (3, 40)) * rng.choice([-1, 1], (3, 40))).astype(np.float32)
    values[0, :6] = [0.0, -0.0, 1.0, -2.0, 0.5, 96.0]  # exactly representable in all three
    array, raw_dtype = encode(values)
    tensor = write_and_read_back(tmp_path / "f.gguf", array, raw_dtype=raw_dtype)
    assert tensor.tensor_type == qtype
    restored = dequantize(tensor)
    assert restored.dtype == np.float32 and restored.shape == values.shape
    np.testing.assert_allclose(restored, values, rtol=relative_error, atol=0)
    np.testing.assert_array_equal(restored[0, :6], values[0, :6])
    assert np.signbit(restored[0, 1])


def block_step(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The distance between neighbouring levels in each block float32[rows, blocks]."""
    if qtype == Q8_0:  # levels -127..127 span the largest magnitude
        return np.abs(blocks).max(axis=-1) / 127
    if qtype == Q4_0:  # levels -8..7, the largest magnitude sits on -8
        return np.abs(blocks).max(axis=-1) / 8
    return (blocks.max(axis=-1) - blocks.min(axis=-1)) / 15  # Q4_1: 16 levels from min to max


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda qtype: qtype.name)
def test_quantized_weights_come_back_within_one_step(tmp_path, qtype):
    weights = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    tensor = write_and_read_back(
        tmp_path / "w.gguf", quants.quantize(weights, qtype), raw_dtype=qtype
    )
    restored = dequantize(tensor)
    assert restored.shape == weights.shape
    blocks = weights.reshape(4, 2, 32)
    error = np.abs(restored.reshape(4, 2, 32) - blocks)
    step = block_step(blocks, qtype)[..., None]
    # Rounding to the nearest level costs half a step, clipping at Q4_0's top level up to one;
    # the 1% covers the float16 rounding of the stored scale.
    assert (error <= 1.01 * step).all()
    assert error.mean() < step.mean() / 3  # rounding, not an offset: the mean is near step / 4
