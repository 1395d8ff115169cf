"""The decode-attention CPU kernel (kernels/attention.cc) agrees with the pure-JAX
attention it replaces, which stays the reference and serves prefill and other backends.

Both compute in float32, over a float32 or a float16 cache (which both convert
exactly); they differ in the order of the sums and in the kernel's polynomial exp (a
few ulps), which keeps them within 1e-5 of max |out| (about 1e-6 seen).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foresight_lab.models import cpu_kernels
from foresight_lab.models.decoder import attend

TOLERANCE = 1e-5  # of max |out|
LAYERS, SLOTS, LENGTH = 3, 6, 40
LAYER = 1  # the layer the tests attend over; the others must not be read


def random_case(batch, heads, kv_heads, head_dim, seed=0, cache_dtype=np.float32, length=LENGTH):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, 1, heads, head_dim)).astype(np.float32)
    # Keys scaled up so the softmax is far from uniform and its max matters.
    shape = (LAYERS, SLOTS, kv_heads, length, head_dim)
    k = (3 * rng.standard_normal(shape)).astype(cache_dtype)
    v = rng.standard_normal(shape).astype(cache_dtype)
    return q, k, v


def both(q, k, v, positions, rows, kv_length):
    """(kernel, reference) outputs; rows None: batch row b reads cache row b."""
    run = functools.partial(attend, kv_length=kv_length)
    run = jax.jit(run, static_argnames="use_kernel")
    positions = jnp.asarray(positions, jnp.int32)[:, None]
    rows = None if rows is None else jnp.asarray(rows, jnp.int32)
    args = (q, k, v, positions, rows, jnp.int32(LAYER))
    return np.asarray(run(*args, use_kernel=True)), np.asarray(run(*args, use_kernel=False))


def assert_close(got, expected):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 24])  # AVX2 paths and the portable one
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4)])
def test_the_kernel_agrees_with_the_reference(head_dim, heads, kv_heads, cache_dtype):
    seed = head_dim + heads
    q, k, v = random_case(4, heads, kv_heads, head_dim, seed=seed, cache_dtype=cache_dtype)
    # Short and long histories, position 0 (sees one entry), up to the last of kv_length.
    got, expected = both(q, k, v, [0, 7, 31, 17], rows=[1, 4, 2, 5], kv_length=32)
    assert_close(got, expected)


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
def test_rows_past_the_window_see_all_of_it_and_negative_ones_weigh_it_equally(cache_dtype):
    q, k, v = random_case(3, 9, 3, 64, seed=1, cache_dtype=cache_dtype)
    # An idle row sits at or beyond the cache length; the reference then sees every
    # position of the window. A negative position masks all of them: equal weights.
    got, expected = both(q, k, v, [LENGTH + 5, -1, 3], rows=None, kv_length=16)
    assert_close(got, expected)


def test_rows_past_the_cache_are_clamped_as_the_gather_does():
    q, k, v = random_case(4, 9, 3, 64, seed=2)
    got, expected = both(q, k, v, [5, 9, 12, 2], rows=[SLOTS + 2, 0, 3, 3], kv_length=LENGTH)
    assert_close(got, expected)


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
def test_a_row_reads_only_its_own_visible_positions(cache_dtype):
    # Entries beyond a row's position (stale ones from an earlier occupant), other
    # rows' entries and other layers' must not change its output.
    q, k, v = random_case(2, 9, 3, 64, seed=3, cache_dtype=cache_dtype)
    got, _ = both(q, k, v, [10, 20], rows=[2, 3], kv_length=32)
    k2, v2 = k.copy(), v.copy()
    k2[LAYER, 2, :, 11:], v2[LAYER, 2, :, 11:] = 1e3, -1e3
    k2[LAYER, [0, 1, 4, 5]], v2[LAYER, [0, 1, 4, 5]] = np.nan, np.nan
    k2[[0, 2]], v2[[0, 2]] = np.nan, np.nan
    got2, _ = both(q, k2, v2, [10, 20], rows=[2, 3], kv_length=32)
    np.testing.assert_array_equal(got2[0], got[0])


def lowered(length: int, use_kernel: bool = True, cache_dtype=jnp.float32) -> str:
    q = jax.ShapeDtypeStruct((2, length, 9, 64), jnp.float32)
    cache = jax.ShapeDtypeStruct((LAYERS, SLOTS, 3, LENGTH, 64), cache_dtype)
    positions = jax.ShapeDtypeStruct((2, length), jnp.int32)
    run = jax.jit(attend, static_argnums=(6, 7))
    args = (q, cache, cache, positions, None, jnp.int32(LAYER), 32, use_kernel)
    return run.lower(*args).as_text()


def test_decode_uses_the_kernel_and_prefill_the_reference():
    assert cpu_kernels.available()
    assert cpu_kernels.DECODE_ATTENTION in lowered(1)
    assert cpu_kernels.DECODE_ATTENTION in lowered(1, cache_dtype=jnp.float16)
    assert cpu_kernels.DECODE_ATTENTION not in lowered(1, cache_dtype=jnp.bfloat16)
    assert cpu_kernels.DECODE_ATTENTION not in lowered(8)  # a prefill chunk
    assert cpu_kernels.DECODE_ATTENTION not in lowered(1, use_kernel=False)  # a mesh


def test_a_float16_cache_moves_the_output_by_about_its_rounding():
    # The same keys and values, stored as float16: the output moves by about float16's
    # relative rounding (2^-11 of each entry), not more; the kernel and the reference
    # see the same rounded entries, so they still agree to float32's precision.
    q, k, v = random_case(4, 9, 3, 64, seed=4)
    exact, _ = both(q, k, v, [3, 12, 25, 31], rows=[0, 2, 4, 5], kv_length=32)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    got, expected = both(q, k16, v16, [3, 12, 25, 31], rows=[0, 2, 4, 5], kv_length=32)
    assert_close(got, expected)
    moved = np.abs(got - exact).max() / np.abs(exact).max()
    assert 0 < moved < 2e-3  # about 4e-4 seen; 2^-11 is 4.9e-4


# The kernel splits a head's positions into pieces of 128 and merges their softmaxes.
LONG = 520
AROUND_PIECES = [0, 127, 128, 129, 300, 383, 384, LONG - 1, LONG + 7, -1]


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
def test_heads_read_in_pieces_agree_with_the_reference(cache_dtype):
    batch = len(AROUND_PIECES)
    q, k, v = random_case(batch, 9, 3, 64, seed=6, cache_dtype=cache_dtype, length=LONG)
    rows = [b % SLOTS for b in range(batch)]
    got, expected = both(q, k, v, AROUND_PIECES, rows=rows, kv_length=LONG)
    assert_close(got, expected)


def test_a_row_gets_the_same_bits_alone_and_in_any_batch():
    q, k, v = random_case(4, 9, 3, 64, seed=7, cache_dtype=np.float16, length=LONG)
    together, _ = both(q, k, v, [450, 12, 300, 129], rows=[3, 0, 1, 2], kv_length=LONG)
    for b, (position, row) in enumerate([(450, 3), (12, 0), (300, 1), (129, 2)]):
        alone, _ = both(q[b : b + 1], k, v, [position], rows=[row], kv_length=LONG)
        np.testing.assert_array_equal(alone[0], together[b])


@pytest.mark.parametrize("rows", [None, [4, 1]])
def test_a_long_chunks_attention_in_blocks_of_rows_is_the_whole_at_once(monkeypatch, rows):
    """Prefill attends QUERY_BLOCK query rows at a time once a chunk has more; each row's
    scores, softmax and sum are its own, so the blocks agree with the whole but for the
    order XLA's dots sum in (about 3e-7 of max |out| seen)."""
    from foresight_lab.models import decoder

    batch, tokens, heads, kv_heads, head_dim = 2, 16, 4, 2, 8
    rng = np.random.default_rng(3)
    q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
    _, k, v = random_case(batch, heads, kv_heads, head_dim, seed=3)
    positions = jnp.asarray(np.arange(tokens)[None] + np.array([[0], [9]]), jnp.int32)
    rows = None if rows is None else jnp.asarray(rows, jnp.int32)

    def prefill(block):  # (output, whether it looped over blocks)
        monkeypatch.setattr(decoder, "QUERY_BLOCK", block)
        run = jax.jit(functools.partial(attend, kv_length=32, use_kernel=False))
        args = (q, k, v, positions, rows, jnp.int32(LAYER))
        return np.asarray(run(*args)), "while" in run.lower(*args).as_text()

    # 2 groups x 16 tokens = 32 query rows: in blocks of 8, and all at once.
    (blocked, looped), (whole, at_once_looped) = prefill(8), prefill(32)
    assert looped and not at_once_looped
    assert not np.allclose(whole, 0)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=TOLERANCE * np.abs(whole).max())
