"""The sampler: pure functions of logits, per-row parameters and per-row keys.

Every row carries its own temperature, top_p, top_k and min_p as traced arrays, so
one compiled function serves any mix of requests. Each truncation is a threshold on
the scaled logits; a row samples by inverse CDF over the kept tokens in vocabulary
order with one uniform number from its own key. The threshold is exact whether it
came from the top CANDIDATES or from a full sort, so a row's token never depends on
which path its batch took, nor on its neighbours.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

CANDIDATES = 256  # top-k prefilter width; a full sort runs only when a row needs more
TOP_LOGPROBS = 20  # the most alternatives a request may ask logprobs for (OpenAI's limit)


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling parameters, each of shape [B]."""

    temperature: jax.Array  # Float['B']; 0 = greedy
    top_p: jax.Array  # Float['B']; 1 = off
    top_k: jax.Array  # Int['B']; 0 = off
    min_p: jax.Array  # Float['B']; 0 = off
    presence_penalty: jax.Array  # Float['B']; subtracted once from generated tokens' logits
    frequency_penalty: jax.Array  # Float['B']; subtracted per time a token was generated
    top_logprobs: jax.Array  # Int['B']; alternatives the row reports (0: none)


@flax.struct.dataclass
class Sampled:
    tokens: jax.Array  # Int['B']
    logprobs: jax.Array  # Float['B'], of the chosen token under the model's distribution
    top_tokens: jax.Array  # Int['B TOP_LOGPROBS'], zeros when no row asked for any
    top_logprobs: jax.Array  # Float['B TOP_LOGPROBS'], zeros when no row asked for any


def row_keys(seeds: jax.Array, choices: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row: PRNGKey(seed) folded with the choice index, then the position.

    seeds: UInt32['B 2'] as (high, low) words, so PRNGKey(seed) for seeds below 2**32.
    """

    def one(seed, choice, position):
        key = jax.random.wrap_key_data(seed, impl="threefry2x32")
        return jax.random.fold_in(jax.random.fold_in(key, choice), position)

    return jax.vmap(one)(seeds, choices, positions)


def _thresholds(sorted_desc: jax.Array, log_total: jax.Array, params: SamplingParams) -> jax.Array:
    """The lowest scaled logit each row keeps, from its top values in descending order.

    sorted_desc: Float['B K'] (K = CANDIDATES or the vocabulary), log_total: Float['B'].
    """
    width = sorted_desc.shape[-1]
    lowest = jnp.full(sorted_desc.shape[:1], -jnp.inf)
    # top_k: the k-th largest value.
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(params.top_k - 1, 0, width - 1)[:, None], 1)
    by_top_k = jnp.where(params.top_k > 0, kth[:, 0], lowest)
    # top_p: the value at which the cumulative probability first reaches top_p.
    cumulative = jnp.cumsum(jnp.exp(sorted_desc - log_total[:, None]), axis=-1)
    cut = jnp.argmax(cumulative >= params.top_p[:, None], axis=-1)
    by_top_p = jnp.where(
        params.top_p < 1.0, jnp.take_along_axis(sorted_desc, cut[:, None], 1)[:, 0], lowest
    )
    # min_p: probability at least min_p times the top token's.
    by_min_p = jnp.where(params.min_p > 0, sorted_desc[:, 0] + jnp.log(params.min_p), lowest)
    return jnp.maximum(jnp.maximum(by_top_k, by_top_p), by_min_p)


def _needs_full_sort(top: jax.Array, log_total: jax.Array, params: SamplingParams) -> jax.Array:
    """True when some row's top_p or top_k reaches past the CANDIDATES prefilter."""
    mass = jnp.sum(jnp.exp(top - log_total[:, None]), axis=-1)
    beyond_p = (params.top_p < 1.0) & (mass < params.top_p)
    beyond_k = params.top_k > top.shape[-1]
    return jnp.any((beyond_p | beyond_k) & (params.temperature > 0))


def apply_penalties(logits: jax.Array, counts: jax.Array, params: SamplingParams) -> jax.Array:
    """OpenAI's presence and frequency penalties; counts: Int['B V'] of generated tokens."""
    presence = params.presence_penalty[:, None] * (counts > 0)
    frequency = params.frequency_penalty[:, None] * counts
    return logits - presence - frequency


def sampling_weights(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """What the sampler draws from, Float['B V']: exp of the tempered logits on the tokens
    that top_k, top_p and min_p keep, 0 elsewhere (not normalized)."""
    vocab = logits.shape[-1]
    # Two top_k calls in sample(), not one sliced: XLA's CPU backend keeps a fast TopK
    # only while its outputs are used whole, and falls back to a full sort otherwise.
    _, top_tokens = jax.lax.top_k(logits, min(CANDIDATES, vocab))
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    log_total = jax.nn.logsumexp(scaled, axis=-1)
    # Scaling by a positive temperature keeps the order, so the prefilter is reused.
    top_scaled = jnp.take_along_axis(scaled, top_tokens, axis=-1)
    threshold = jax.lax.cond(
        _needs_full_sort(top_scaled, log_total, params),
        lambda: _thresholds(-jnp.sort(-scaled, axis=-1), log_total, params),
        lambda: _thresholds(top_scaled, log_total, params),
    )
    return jnp.where(
        scaled >= threshold[:, None], jnp.exp(scaled - scaled.max(-1, keepdims=True)), 0.0
    )


def sampling_distribution(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The probability of each next token under these parameters, Float['B V'];
    temperature 0 puts all of it on the argmax."""
    weights = sampling_weights(logits, params)
    sampled = weights / weights.sum(axis=-1, keepdims=True)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=weights.dtype)
    return jnp.where(params.temperature[:, None] > 0, sampled, greedy)


def sample(
    logits: jax.Array, params: SamplingParams, keys: jax.Array, counts: jax.Array | None = None
) -> Sampled:
    """Next tokens for logits: Float['B V'] with per-row params and keys.

    Reported logprobs are the model's own; penalties (with counts) and the
    temperature and truncations shape only which token is drawn. The alternatives (a
    top_k over the vocabulary, 2 ms a batch-8 step on two cores) and the penalties are
    computed only in steps where some row asks for them; both branches are in the one
    compiled function.
    """
    vocab = logits.shape[-1]
    raw_logits = logits
    report_tokens, report_logprobs = jax.lax.cond(
        jnp.any(params.top_logprobs > 0), top_logprobs, _no_alternatives, logits
    )
    if counts is not None:
        penalized = (params.presence_penalty != 0) | (params.frequency_penalty != 0)
        logits = jax.lax.cond(
            jnp.any(penalized),
            lambda: apply_penalties(logits, counts, params),
            lambda: logits,
        )

    def draw() -> jax.Array:
        cdf = jnp.cumsum(sampling_weights(logits, params), axis=-1)
        uniform = jax.vmap(lambda key: jax.random.uniform(key))(keys)
        drawn = jnp.sum(cdf <= (uniform * cdf[:, -1])[:, None], axis=-1, dtype=jnp.int32)
        return jnp.minimum(drawn, vocab - 1)

    # A batch of greedy rows skips the truncations and the draw (several passes over
    # the vocabulary a row); both branches are in the one compiled function.
    rows = logits.shape[0]
    drawn = jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda: jnp.zeros(rows, jnp.int32))
    greedy = jnp.argmax(logits, axis=-1)  # first of equal maxima, as torch does
    tokens = jnp.where(params.temperature > 0, drawn, greedy).astype(jnp.int32)
    return Sampled(
        tokens=tokens,
        logprobs=token_logprobs(raw_logits, tokens),
        top_tokens=report_tokens,
        top_logprobs=report_logprobs,
    )


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[..., token] for logits: Float['... V'] and tokens: Int['...'],
    equal to it bit for bit, without the whole log_softmax in memory (at a prompt's
    every position that is a [P, V] array)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return (picked - top[..., 0]) - log_total


def _no_alternatives(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zeros in the shapes of top_logprobs(logits)."""
    shape = (*logits.shape[:-1], min(TOP_LOGPROBS, logits.shape[-1]))
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, logits.dtype)


def top_logprobs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The TOP_LOGPROBS most likely tokens, Int['... K'], and their logprobs,
    Float['... K'], chosen on the logits (the order is the same) so that no [..., V]
    array of logprobs is formed."""
    top_logits, tokens = jax.lax.top_k(logits, min(TOP_LOGPROBS, logits.shape[-1]))
    return tokens.astype(jnp.int32), top_logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
