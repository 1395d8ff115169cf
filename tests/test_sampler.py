"""The sampler: truncations keep the right tokens, frequencies follow the distribution,
and a row's token never depends on the rows beside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foresight_lab.engine.sampler import (
    CANDIDATES,
    SamplingParams,
    apply_penalties,
    row_keys,
    sample,
    token_logprobs,
    top_logprobs,
)

ROWS = 4000  # many rows of the same logits = many independent draws in one call

sample_jit = jax.jit(sample)


def params(
    rows,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    presence=0.0,
    frequency=0.0,
    alternatives=0,
):
    full = lambda value, dtype: jnp.full(rows, value, dtype)
    return SamplingParams(
        full(temperature, jnp.float32),
        full(top_p, jnp.float32),
        full(top_k, jnp.int32),
        full(min_p, jnp.float32),
        full(presence, jnp.float32),
        full(frequency, jnp.float32),
        full(alternatives, jnp.int32),
    )


def keys(rows, seed=0):
    seeds = jnp.stack([jnp.zeros(rows, jnp.uint32), jnp.full(rows, seed, jnp.uint32)], axis=1)
    return row_keys(seeds, jnp.zeros(rows, jnp.int32), jnp.arange(rows))


def draws(logits_row, **kwargs) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (ROWS, len(logits_row)))
    return np.asarray(sample_jit(logits, params(ROWS, **kwargs), keys(ROWS)).tokens)


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def frequencies(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def test_frequencies_follow_the_tempered_distribution():
    for temperature in (1.0, 0.5, 2.0):
        expected = np.exp(LOGITS / temperature) / np.exp(LOGITS / temperature).sum()
        observed = frequencies(draws(LOGITS, temperature=temperature), len(LOGITS))
        np.testing.assert_allclose(observed, expected, atol=0.03)


def test_temperature_zero_is_argmax():
    assert set(draws(LOGITS, temperature=0.0)) == {0}


def test_top_k_keeps_the_k_most_likely():
    observed = frequencies(draws(LOGITS, top_k=2), len(LOGITS))
    np.testing.assert_allclose(observed[:2], [0.4 / 0.65, 0.25 / 0.65], atol=0.03)
    assert observed[2:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    observed = frequencies(draws(LOGITS, top_p=0.7), len(LOGITS))  # 0.4 + 0.25 < 0.7 <= +0.15
    assert observed[3:].sum() == 0 and observed[2] > 0


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    observed = frequencies(draws(LOGITS, min_p=0.3), len(LOGITS))  # keeps p >= 0.12
    assert observed[3:].sum() == 0 and observed[2] > 0


def test_logprobs_are_the_models_whatever_the_temperature():
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (2, len(LOGITS)))
    out = sample_jit(logits, params(2, temperature=1.7, top_k=3, alternatives=5), keys(2))
    expected = jax.nn.log_softmax(logits, -1)[0]
    np.testing.assert_allclose(out.logprobs, expected[np.asarray(out.tokens)], rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs[0, : len(LOGITS)], expected, rtol=1e-6)


def test_logprobs_without_a_whole_log_softmax_equal_its_values():
    """A prompt's logprobs at every position ([P, V] logits) are read without forming
    log_softmax; the chosen tokens' are its values bit for bit, the top ones to rounding,
    in its order."""
    logits = jax.random.normal(jax.random.key(3), (3, 7, 500)) * 4
    tokens = jax.random.randint(jax.random.key(4), (3, 7), 0, 500)
    expected = jax.nn.log_softmax(logits, axis=-1)
    chosen = jax.jit(token_logprobs)(logits, tokens)
    np.testing.assert_array_equal(
        chosen, jnp.take_along_axis(expected, tokens[..., None], -1)[..., 0]
    )
    top_tokens, top_values = jax.jit(top_logprobs)(logits)
    want_values, want_tokens = jax.lax.top_k(expected, top_tokens.shape[-1])
    np.testing.assert_array_equal(top_tokens, want_tokens)
    np.testing.assert_allclose(top_values, want_values, rtol=1e-5)


def test_alternatives_are_computed_only_when_a_row_asks():
    """The vocabulary's top_k for logprobs runs only in a step where some row reports
    alternatives; a row that asks gets the same whatever its neighbours ask."""
    logits = jax.random.normal(jax.random.key(5), (3, 300)) * 3
    none = sample_jit(logits, params(3, temperature=0.0), keys(3))
    assert not np.asarray(none.top_tokens).any() and not np.asarray(none.top_logprobs).any()
    asking = params(3, temperature=0.0)
    asking = asking.replace(top_logprobs=asking.top_logprobs.at[1].set(4))
    some = sample_jit(logits, asking, keys(3))
    want_tokens, want_values = top_logprobs(logits)
    np.testing.assert_array_equal(some.top_tokens[1], want_tokens[1])
    np.testing.assert_array_equal(some.top_logprobs[1], want_values[1])
    np.testing.assert_array_equal(some.tokens, none.tokens)
    np.testing.assert_array_equal(some.logprobs, none.logprobs)


@pytest.mark.parametrize("truncation", [dict(top_p=0.9), dict(top_k=40), dict(min_p=0.05), dict()])
def test_a_rows_token_does_not_depend_on_its_neighbours(truncation):
    """One neighbour forces the full-sort path (a flat distribution with top_p near 1, wider
    than the prefilter); the row under test must draw the same token either way."""
    vocab = 4 * CANDIDATES
    rng = np.random.RandomState(0)
    row = rng.normal(0, 3, vocab).astype(np.float32)
    flat = rng.normal(0, 0.01, vocab).astype(np.float32)
    for seed in range(20):
        alone = sample_jit(jnp.asarray([row, row]), params(2, **truncation), keys(2, seed))
        mixed_params = params(2, **truncation)
        mixed_params = mixed_params.replace(top_p=mixed_params.top_p.at[1].set(0.999))
        mixed = sample_jit(jnp.asarray([row, flat]), mixed_params, keys(2, seed))
        assert int(alone.tokens[0]) == int(mixed.tokens[0])


def test_a_flat_distribution_with_wide_top_p_can_reach_past_the_prefilter():
    vocab = 4 * CANDIDATES
    flat = np.zeros(vocab, np.float32)
    tokens = draws(flat, top_p=0.999)
    assert tokens.max() > CANDIDATES  # the full sort ran: tokens beyond the prefilter were drawn


def test_keys_differ_by_seed_choice_and_position():
    seeds = jnp.asarray([[0, 1], [0, 1], [0, 1], [0, 2]], jnp.uint32)
    k = row_keys(seeds, jnp.asarray([0, 1, 0, 0]), jnp.asarray([5, 5, 6, 5]))
    data = {tuple(np.asarray(jax.random.key_data(x)).tolist()) for x in k}
    assert len(data) == 4
    same = row_keys(seeds[:1], jnp.asarray([0]), jnp.asarray([5]))
    assert np.array_equal(jax.random.key_data(same[0]), jax.random.key_data(k[0]))


def test_penalties_lower_the_logits_of_generated_tokens():
    logits = jnp.zeros((1, 4))
    counts = jnp.asarray([[0, 1, 3, 0]])
    penalized = apply_penalties(logits, counts, params(1, presence=0.5, frequency=0.25))
    np.testing.assert_allclose(penalized, [[0.0, -0.75, -1.25, 0.0]])


def test_a_strong_presence_penalty_steers_greedy_away_from_repeats():
    counts = jnp.asarray([[1, 0, 0, 0, 0, 0]])
    logits = jnp.asarray([LOGITS], jnp.float32)
    plain = sample_jit(logits, params(1, temperature=0.0), keys(1), counts)
    steered = sample_jit(logits, params(1, temperature=0.0, presence=2.0), keys(1), counts)
    assert int(plain.tokens[0]) == 0 and int(steered.tokens[0]) == 1
    np.testing.assert_allclose(steered.logprobs, jax.nn.log_softmax(logits)[0, 1], rtol=1e-6)


def test_the_compiled_sampler_keeps_xla_fast_top_k_on_cpu():
    """A sliced top_k output makes XLA's CPU backend sort the whole vocabulary each step."""
    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA's CPU backend")
    logits = jnp.zeros((2, 4 * CANDIDATES))
    text = sample_jit.lower(logits, params(2), keys(2)).compile().as_text()
    assert text.count('custom_call_target="TopK"') == 2
    # the only sort is the rare full-sort branch of the truncation threshold
    assert text.count(" sort(") == 1
