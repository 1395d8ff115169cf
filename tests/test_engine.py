"""The engine on a tiny random Llama: determinism, batching, stops, limits, compilations."""

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foresight_lab import InvalidRequestError
from foresight_lab.engine.kv_cache import EngineConfig, allocate
from foresight_lab.lab import Lab
from tests.conftest import logprob_trace, recording_calls, run_concurrently

PROMPT = [5, 17, 42, 99, 7, 250, 3]
OTHER_PROMPTS = [[1, 2, 3], list(range(40, 100)), [300, 12, 8, 8, 9], list(range(100, 250))]
LONG_PROMPT = [(7 * i) % 300 + 3 for i in range(170)]  # three prefill chunks of 64


@pytest.fixture(scope="module", autouse=True)
def warm(tiny_lab):
    tiny_lab.warmup(progress=False)


def options(**kwargs):
    from foresight_lab.engine.request import SamplingOptions

    return SamplingOptions(**{"max_tokens": 12, **kwargs})


def test_greedy_ignores_the_seed(tiny_lab):
    a = tiny_lab.generate(PROMPT, temperature=0, max_tokens=12, seed=1)
    b = tiny_lab.generate(PROMPT, temperature=0, max_tokens=12, seed=2)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 12


def test_same_seed_same_tokens(tiny_lab):
    a = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=11)
    b = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=11)
    assert a.token_ids == b.token_ids


def test_different_seeds_give_different_tokens(tiny_lab):
    runs = {
        tuple(tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=s).token_ids)
        for s in range(4)
    }
    assert len(runs) == 4


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.02, seed=3)],
)
def test_same_tokens_alone_and_among_15_other_requests(tiny_lab, sampling):
    mine = options(**sampling, logprobs=True)
    alone = tiny_lab.engine.submit(PROMPT, mine).result()
    # Prompts of 1 to 170 tokens (shared prefill calls, and three chunks) with every
    # kind of sampling, long enough to be decoding while this request does.
    others = [
        (
            [(31 * i + 7 * k) % 300 + 3 for k in range(length)],
            options(temperature=[0, 1.0, 0.6][i % 3], top_k=i, seed=i, max_tokens=40),
        )
        for i, length in enumerate([1, 3, 9, 16, 17, 30, 64, 65, 100, 170, 5, 12, 40, 2, 7])
    ]
    with recording_calls(tiny_lab, "decode") as calls:
        batched = run_concurrently(tiny_lab, [*others[:7], (PROMPT, mine), *others[7:]])
    # The logprobs too, to the bit: a row's logits do not depend on its batch.
    assert logprob_trace(batched[7]) == logprob_trace(alone)
    assert all(len(b.choices[0].token_ids) == 40 for b in batched[:7] + batched[8:])
    # Some steps decoded all sixteen at once (a row is live when its position is real).
    cache_length = tiny_lab.engine.config.max_cache_length
    assert max(int(np.sum(np.asarray(c[5]) < cache_length)) for c in calls) == 16


def test_short_prompts_that_arrive_together_share_prefill_calls_and_keep_their_tokens(tiny_lab):
    prompts = [[9, 8, 7, 6, 5], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47], [3, 1, 4, 1, 5, 9]]
    requests = [(p, options(temperature=0.9, seed=i, max_tokens=10)) for i, p in enumerate(prompts)]
    alone = [tiny_lab.engine.submit(*request).result().token_ids for request in requests]
    with recording_calls(tiny_lab, "prefill") as calls:
        together = run_concurrently(tiny_lab, requests)
    assert [r.token_ids for r in together] == alone
    # Each prompt fills a 16-token chunk; two such rows still run the matmuls as one
    # alone does (the CPU kernel, at most 32 rows), so they pair up: two calls, not four.
    tokens = [args[2] for args in calls]
    assert [t.shape for t in tokens] == [(2, 16), (2, 16)]
    slots = sorted(int(slot) for args in calls for slot in args[4])
    assert slots == [0, 1, 2, 3]


def test_a_prompt_prefilled_beside_another_writes_the_same_keys_and_values(tiny_lab):
    scheduler = tiny_lab.engine._scheduler
    steps, config = scheduler.steps, scheduler.config

    def prefill(prompts, slots):
        tokens = np.zeros((len(prompts), 16), np.int32)
        positions = np.full((len(prompts), 16), config.max_cache_length, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
            positions[row, : len(prompt)] = np.arange(len(prompt))
        cache = allocate(scheduler.model_config, config)
        cache, _ = steps.prefill(
            scheduler.params, cache, tokens, positions, np.int32(slots), kv_length=64
        )
        return [np.asarray(part[:, slots[0]]) for part in cache]

    alone = prefill([PROMPT], [3])
    beside = prefill([PROMPT, OTHER_PROMPTS[2]], [3, 5])
    for a, b in zip(alone, beside, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a).sum() > 0


def test_each_choice_of_n_is_the_request_with_that_index(tiny_lab):
    many = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=21, n=3)
    single = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=21, n=1)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].token_ids == single.token_ids
    assert len({tuple(c.token_ids) for c in many.choices}) == 3
    again = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=12, seed=21, n=3)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in many.choices]
    assert many.usage.completion_tokens == 36 and many.usage.prompt_tokens == len(PROMPT)


def test_streamed_text_equals_the_completion(tiny_lab):
    text = "".join(tiny_lab.generate("the quick brown", temperature=0, max_tokens=20, stream=True))
    assert text == tiny_lab.generate("the quick brown", temperature=0, max_tokens=20).text


def test_decode_with_the_cpu_attention_kernel_needs_one_cache_bucket(tiny_lab):
    # The kernel reads only each row's visible positions, so one window serves every
    # step; the mixed workload below then runs decode past the smallest bucket.
    scheduler = tiny_lab.engine._scheduler
    assert scheduler.steps.decode_reads_cache_in_place
    decode = [shape for shape in scheduler.shapes() if shape[0] == "decode"]
    assert {kv for *_, kv in decode} == {scheduler.config.max_cache_length}
    assert sorted(rows for _, rows, _, _ in decode) == list(scheduler.config.batch_buckets)


def test_no_compilation_after_warmup_for_any_request_mix(tiny_lab):
    before = tiny_lab.engine.compile_count
    assert before > 0
    requests = [
        (list(range(1, length + 1)), options(**sampling))
        for length, sampling in [
            (1, dict(temperature=0, max_tokens=3)),
            (15, dict(temperature=0.7, top_p=0.5, seed=1, n=2)),
            (33, dict(temperature=1.3, top_k=5, seed=2, max_tokens=40)),
            (64, dict(temperature=0.2, min_p=0.1, seed=3, n=3)),
            (150, dict(temperature=1.0, top_p=0.99, top_k=300, seed=4, max_tokens=100)),
            (2, dict(temperature=2.0, seed=5, logprobs=True, top_logprobs=5)),
            (70, dict(temperature=0.5, seed=6, presence_penalty=1.0, prompt_logprobs=3)),
            (9, dict(temperature=0, frequency_penalty=-0.5, prompt_logprobs=0, stop=["e", "th"])),
        ]
    ]
    run_concurrently(tiny_lab, requests)
    for prompt, o in requests:
        tiny_lab.engine.submit(prompt, o).result()
    assert tiny_lab.engine.compile_count == before


def test_stop_string_split_across_tokens_is_found_and_cut(tiny_lab):
    sampling = dict(temperature=1.0, seed=5, max_tokens=40)
    free = tiny_lab.generate("hello world", **sampling)
    pieces = [tiny_lab.detokenize([t]) for t in free.token_ids]
    whole = [p != "" and "\ufffd" not in p for p in pieces]
    # A stop made of the end of one token and the start of the next.
    i = next(i for i in range(3, len(pieces) - 1) if whole[i] and whole[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    expected = free.text[: free.text.index(stop)]
    stopped = tiny_lab.generate("hello world", **sampling, stop=[stop, "never-there"])
    assert stopped.text == expected
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens <= i + 2 < 40
    streamed = "".join(tiny_lab.generate("hello world", **sampling, stop=stop, stream=True))
    assert streamed == expected


def test_max_tokens_gives_finish_reason_length_and_usage(tiny_lab):
    out = tiny_lab.generate(PROMPT, temperature=0, max_tokens=5)
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(PROMPT)
    assert out.usage.completion_tokens == 5 == len(out.token_ids)
    assert out.usage.total_tokens == len(PROMPT) + 5


def test_eos_ends_a_choice_with_finish_reason_stop(tiny_lab):
    free = tiny_lab.generate(PROMPT, temperature=0, max_tokens=10)
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    model = dataclasses.replace(tiny_lab.model, eos_token_ids=frozenset({eos}))
    lab = Lab(model, EngineConfig(max_slots=1, max_cache_length=64))
    penalized = dict(temperature=0, max_tokens=10, frequency_penalty=2.0, presence_penalty=1.0)
    try:
        fresh = lab.generate(OTHER_PROMPTS[0], **penalized)
        with recording_calls(lab, "decode") as calls:
            out = lab.generate(PROMPT, temperature=0, max_tokens=10)
        steps_for_eos = len(calls)
        after = lab.generate(OTHER_PROMPTS[0], **penalized)
    finally:
        lab.engine.shutdown()
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.usage.completion_tokens == first + 1
    # Decode is pipelined: the step after EOS was dispatched before EOS was read back.
    assert steps_for_eos == first + 2
    # That step wrote into the slot (a cache entry, a penalty count); the slot's next
    # sequence sees none of it.
    assert after.token_ids == fresh.token_ids


def test_warming_up_while_requests_run_leaves_their_tokens_alone(tiny_lab):
    """Warm-up compiles between the running steps; nothing it does may reach a running
    sequence's cache row, penalty counts or next input token."""
    sampling = dict(
        temperature=0.9, seed=5, frequency_penalty=1.5, presence_penalty=0.5, max_tokens=240
    )
    alone = tiny_lab.generate(PROMPT, **sampling)
    # A new engine of the same model: the shared one keeps the shapes it has compiled,
    # and warming it up again has nothing to do.
    lab = Lab(tiny_lab.model, tiny_lab.engine.config)
    try:
        handles = [lab.engine.submit(PROMPT, options(**sampling)) for _ in range(3)]
        while not lab.engine.active_slots:
            time.sleep(0.001)
        lab.warmup(progress=False)
        assert lab.engine.active_slots, "the requests ended before the warm-up did"
        assert [h.result().token_ids for h in handles] == [alone.token_ids] * 3
    finally:
        lab.engine.shutdown()


def test_warmup_compiles_without_running_a_step(tiny_lab):
    """Shapes are compiled ahead of time: running them (a prompt's logprobs at the longest
    chunk most of all) cost memory and time. A run would replace the donated state."""
    scheduler = tiny_lab.engine._scheduler
    state = [scheduler.cache, scheduler.counts, scheduler.last_tokens]
    tiny_lab.warmup(progress=False)
    after = [scheduler.cache, scheduler.counts, scheduler.last_tokens]
    assert all(a is b for a, b in zip(after, state, strict=True))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(after))


def test_warmed_shapes_run_the_executables_kept_by_the_engine(tiny_lab, monkeypatch):
    """Warm-up keeps each shape's executable, so a request of any kind runs without the
    jitted functions (or JAX's caches, which a serving process clears after warm-up)."""
    steps = tiny_lab.engine._scheduler.steps
    names = ["prefill", "decode", "copy_row", "clear_counts", "prompt_logprobs"]
    for name in names:

        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"{name} reached jax.jit: its shape was not kept")

        monkeypatch.setattr(getattr(steps, name), "jitted", refuse)
    out = tiny_lab.generate(
        LONG_PROMPT, temperature=0.7, seed=3, n=2, max_tokens=5, prompt_logprobs=2
    )
    assert [len(c.token_ids) for c in out.choices] == [5, 5]
    assert len(out.prompt_logprobs) == len(LONG_PROMPT)


def test_max_tokens_dispatches_no_step_past_the_last_token(tiny_lab):
    with recording_calls(tiny_lab, "decode") as calls:
        out = tiny_lab.generate(PROMPT, temperature=0, max_tokens=7, ignore_eos=True)
    assert len(out.token_ids) == len(calls) == 7


def test_logprobs_of_chosen_and_top_tokens(tiny_lab):
    out = tiny_lab.generate(PROMPT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=4)
    entries = out.choices[0].logprobs
    assert [e.token_id for e in entries] == out.token_ids
    for e in entries:
        assert len(e.top_logprobs) == 4
        assert e.top_logprobs[0].token_id == e.token_id  # greedy picks the most likely
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
    assert tiny_lab.generate(PROMPT, max_tokens=2).choices[0].logprobs is None


def test_a_cancelled_stream_frees_its_slot(tiny_lab):
    stream = tiny_lab.generate(PROMPT, temperature=1.0, max_tokens=200, seed=1, n=2, stream=True)
    next(stream)
    assert tiny_lab.engine.active_slots == 2
    stream.close()
    deadline = time.monotonic() + 10
    while tiny_lab.engine.active_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_lab.engine.active_slots == 0


def test_freed_memory_is_handed_back_when_the_engine_falls_idle_and_only_then(
    tiny_lab, monkeypatch
):
    from foresight_lab.engine import heap

    engine = tiny_lab.engine
    seen = []  # (slots in use, requests waiting) at each hand-back
    monkeypatch.setattr(
        heap, "return_freed_memory", lambda: seen.append((engine.active_slots, engine.queue_depth))
    )
    run_concurrently(tiny_lab, [(PROMPT, options(n=3, temperature=0))] * 4)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen and set(seen) == {(0, 0)}


def test_requests_beyond_the_slots_wait_their_turn(tiny_lab):
    results = run_concurrently(tiny_lab, [(PROMPT, options(n=6, temperature=0))] * 3)
    assert all(len(r.choices) == 6 for r in results)
    assert all(c.token_ids == results[0].choices[0].token_ids for r in results for c in r.choices)


def test_chat_renders_the_model_template(tiny_lab):
    out = tiny_lab.chat([{"role": "user", "content": "hello"}], temperature=0, max_tokens=4)
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert out.usage.prompt_tokens == len(tiny_lab.tokenize(rendered, add_special_tokens=False))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=2.5), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(n=17), "n"),  # beyond the engine's 16 slots
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=300), "max_tokens"),  # beyond the 256-token context
        (dict(top_logprobs=21), "top_logprobs"),
    ],
)
def test_bad_arguments_name_the_field(tiny_lab, kwargs, field):
    with pytest.raises(InvalidRequestError) as error:
        tiny_lab.generate(PROMPT, **kwargs)
    assert error.value.param == field
    assert field in str(error.value)


def test_a_prompt_longer_than_the_context_is_refused(tiny_lab):
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        tiny_lab.generate(list(range(256)), max_tokens=1)


def test_frequency_penalty_reduces_repetition(tiny_lab):
    plain = tiny_lab.generate(PROMPT, temperature=0, max_tokens=40)
    penalized = tiny_lab.generate(PROMPT, temperature=0, max_tokens=40, frequency_penalty=2.0)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


def test_prompt_logprobs_score_each_prompt_token(tiny_lab):
    out = tiny_lab.generate(PROMPT, temperature=0, max_tokens=3, prompt_logprobs=2)
    scores = out.prompt_logprobs
    assert len(scores) == len(PROMPT) and scores[0] is None
    assert [s.token_id for s in scores[1:]] == PROMPT[1:]
    assert all(s.logprob <= 0 and len(s.top_logprobs) == 2 for s in scores[1:])
    # Scoring the prompt does not change what is generated.
    assert out.token_ids == tiny_lab.generate(PROMPT, temperature=0, max_tokens=3).token_ids


def test_a_prompt_scored_for_its_logprobs_runs_the_shared_prefill(tiny_lab):
    """No second compiled copy of the model: the chunk's hidden states from the prefill
    every prompt runs go to the small prompt_logprobs function."""
    with (
        recording_calls(tiny_lab, "prefill") as prefills,
        recording_calls(tiny_lab, "prompt_logprobs") as scorings,
    ):
        tiny_lab.generate(PROMPT, temperature=0, max_tokens=1, prompt_logprobs=1)
    assert len(prefills) == len(scorings) == 1
    _, hidden, targets = scorings[0]
    assert hidden.shape == (*targets.shape, tiny_lab.model.config.hidden_size)
    kinds = {shape[0] for shape in tiny_lab.engine._scheduler.shapes()}
    assert kinds == {"prefill", "prompt_logprobs", "decode"}


def test_prompt_logprobs_of_a_chunk_that_is_not_whole_blocks_are_every_positions(tiny_lab):
    """The logits are formed a block of positions at a time; a chunk of 48 (a block and
    a half) scores each position as the whole chunk's logits at once do."""
    from foresight_lab.engine.sampler import token_logprobs, top_logprobs
    from foresight_lab.engine.step import LOGPROB_ROWS
    from foresight_lab.models.decoder import output_logits

    steps, params = tiny_lab.engine._scheduler.steps, tiny_lab.engine._scheduler.params
    length = LOGPROB_ROWS + LOGPROB_ROWS // 2
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, length, tiny_lab.model.config.hidden_size), np.float32)
    targets = rng.integers(0, tiny_lab.model.config.vocab_size, (1, length), np.int32)
    picked, top_tokens, top_values = steps.prompt_logprobs(params, hidden, targets)
    logits = output_logits(steps.model, params, jnp.asarray(hidden))
    expected_tokens, expected_values = top_logprobs(logits)
    assert picked.shape == targets.shape and top_tokens.shape == expected_tokens.shape
    np.testing.assert_allclose(picked, token_logprobs(logits, targets), atol=1e-4)
    np.testing.assert_allclose(top_values, expected_values, atol=1e-4)
    assert np.array_equal(top_tokens, expected_tokens)


def test_prompt_logprobs_agree_with_the_decode_path(tiny_lab):
    """The logprob the prefill gives prompt token i+1 equals the one decoding gave it."""
    out = tiny_lab.generate(PROMPT, temperature=0, max_tokens=5, logprobs=True)
    extended = PROMPT + out.token_ids[:4]
    scored = tiny_lab.generate(extended, temperature=0, max_tokens=1, prompt_logprobs=0)
    for generated, rescored in zip(
        out.choices[0].logprobs[:4], scored.prompt_logprobs[len(PROMPT) :], strict=True
    ):
        assert rescored.token_id == generated.token_id
        assert rescored.logprob == pytest.approx(generated.logprob, abs=1e-4)


def test_async_iteration_does_not_block_the_event_loop(tiny_lab):
    import asyncio

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        handle = tiny_lab.engine.submit(PROMPT, options(temperature=0, max_tokens=30))
        completion = await handle.aresult()
        task.cancel()
        return completion, ticks

    completion, ticks = asyncio.run(main())
    assert completion.token_ids == tiny_lab.generate(PROMPT, temperature=0, max_tokens=30).token_ids
    assert ticks > 5


def test_a_full_queue_refuses_new_requests_until_it_drains():
    from foresight_lab.engine.request import QueueFullError
    from tests.tiny import tiny_loaded_model

    lab = Lab(
        tiny_loaded_model("llama"), EngineConfig(max_slots=1, max_cache_length=64, max_queue=2)
    )
    try:
        handles = [
            lab.engine.submit(PROMPT, options(temperature=0, max_tokens=40)) for _ in range(2)
        ]
        with pytest.raises(QueueFullError):
            for _ in range(3):  # the first may already have left the queue for a slot
                handles.append(lab.engine.submit(PROMPT, options(temperature=0, max_tokens=40)))
        results = [h.result() for h in handles]
        assert all(r.token_ids == results[0].token_ids for r in results)
        assert lab.engine.submit(PROMPT, options(temperature=0, max_tokens=2)).result()
    finally:
        lab.engine.shutdown()


def test_a_cache_beyond_free_memory_is_refused_before_allocating(tiny_lab):
    from foresight_lab.engine.kv_cache import CacheBudgetError

    huge = EngineConfig(max_slots=4096, max_cache_length=2**20)
    with pytest.raises(CacheBudgetError, match="lower max_slots or max_cache_length"):
        Lab(tiny_lab.model, huge)


def test_the_kv_cache_is_kept_in_its_configured_dtype(tiny_lab):
    import jax.numpy as jnp

    keys, values = tiny_lab.engine._scheduler.cache
    assert keys.dtype == values.dtype == jnp.float16  # the default
    exact = dataclasses.replace(tiny_lab.engine.config, kv_cache_dtype="float32")
    assert exact.cache_bytes(tiny_lab.model.config) == 2 * tiny_lab.engine.kv_cache_bytes()
    assert tiny_lab.engine.kv_cache_bytes() == keys.nbytes + values.nbytes


def test_an_unknown_activation_width_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="activation_bits must be one of 16, 8, not 4"):
        EngineConfig(activation_bits=4)


def test_an_xla_without_the_cpu_options_compiles_without_them_and_says_so(monkeypatch):
    from foresight_lab.engine import step

    assert step._xla_takes_cpu_options()  # this jaxlib's XLA knows them
    monkeypatch.setattr(step, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    step._xla_takes_cpu_options.cache_clear()
    try:
        with pytest.warns(UserWarning, match="No such compile option.*differ with the batch"):
            jitted = step._jit(jnp.negative)
        assert float(jitted(2.0)) == -2.0
    finally:
        step._xla_takes_cpu_options.cache_clear()


def test_an_unknown_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match="kv_cache_dtype must be one of float16, float32, not 'int8'"
    ):
        EngineConfig(kv_cache_dtype="int8")


def test_a_float32_cache_gives_the_float16_caches_greedy_tokens(tiny_lab):
    # float16 rounds each key and value to 11 significant bits; on this model that
    # moves the logprobs by about 2e-4 and leaves the greedy choices as they were.
    config = dataclasses.replace(tiny_lab.engine.config, kv_cache_dtype="float32")
    exact = Lab(tiny_lab.model, config)
    try:
        greedy = options(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
        got = tiny_lab.engine.submit(LONG_PROMPT, greedy).result()
        expected = exact.engine.submit(LONG_PROMPT, greedy).result()
        assert exact.engine._scheduler.cache[0].dtype == np.float32
    finally:
        exact.engine.shutdown()
    assert got.token_ids == expected.token_ids
    np.testing.assert_allclose(
        [p.logprob for p in got.choices[0].logprobs],
        [p.logprob for p in expected.choices[0].logprobs],
        atol=2e-3,
    )


def test_next_token_distribution_matches_what_greedy_and_truncation_do(tiny_lab):
    dist = tiny_lab.next_token_distribution(PROMPT, top_k=5)
    greedy = tiny_lab.generate(PROMPT, temperature=0, max_tokens=1, logprobs=True)
    assert int(np.argmax(dist.model)) == greedy.token_ids[0]
    assert dist.model.sum() == pytest.approx(1.0, abs=1e-5)
    assert dist.kept == 5 and dist.sampling.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.log(dist.model[greedy.token_ids[0]]) == pytest.approx(
        greedy.choices[0].logprobs[0].logprob, abs=1e-4
    )
    top = dist.top(5)
    assert [t[1] for t in top] == list(np.argsort(-dist.model)[:5])
    assert tiny_lab.next_token_distribution(PROMPT, temperature=0).kept == 1


def test_a_long_prompt_prefilled_in_chunks_between_decode_steps_gives_the_same_tokens(tiny_lab):
    sampling = options(temperature=0.8, seed=17, max_tokens=30)
    alone = tiny_lab.engine.submit(LONG_PROMPT, sampling).result()
    running = tiny_lab.engine.submit(PROMPT, options(temperature=1.0, seed=1, max_tokens=60))
    stream = iter(running)
    next(stream)  # the short request is decoding while the long prompt is prefilled
    batched = tiny_lab.engine.submit(LONG_PROMPT, sampling).result()
    rest = list(stream)
    assert batched.token_ids == alone.token_ids
    assert rest[-1].finish_reason == "length"


def test_a_top_k_beyond_the_vocabulary_keeps_every_token(tiny_lab):
    huge = tiny_lab.generate(PROMPT, temperature=1.0, seed=4, max_tokens=8, top_k=2**40)
    off = tiny_lab.generate(PROMPT, temperature=1.0, seed=4, max_tokens=8, top_k=0)
    assert huge.token_ids == off.token_ids


def test_token_ids_outside_the_vocabulary_are_refused(tiny_lab):
    with pytest.raises(InvalidRequestError, match="token ids must be between 0 and 319"):
        tiny_lab.generate([5, 320], max_tokens=1)


def test_a_decode_step_reads_the_stacked_layers_in_place(tiny_lab):
    # The layers are one loop over stacked weights and cache, [L, ...]. XLA on the CPU
    # copies a dynamic slice out of such a stack before using it, which for the weights
    # costs a whole model's bytes a step; decode must read them through the kernels.
    scheduler = tiny_lab.engine._scheduler
    rows, kv_length = 1, scheduler.decode_cache_buckets[-1]
    weights = [a for a in jax.tree.leaves(scheduler.params["layers"]) if a.ndim == 3]
    layers, slots, kv_heads, length, head_dim = scheduler.cache[0].shape
    one_layer = {(1, *a.shape[1:]) for a in weights} | {(1, rows, kv_heads, kv_length, head_dim)}
    lowered = scheduler.steps.decode.jitted.lower(
        scheduler.params,
        scheduler.cache,
        scheduler.counts,
        scheduler.last_tokens,
        *scheduler._decode_inputs([], rows),
        kv_length=kv_length,
    )
    hlo = lowered.compile().as_text()
    sliced = {
        tuple(int(n) for n in shape.split(","))
        for shape in re.findall(r"= f32\[([\d,]+)\]\S* dynamic-slice\(", hlo)
    }
    assert weights and sliced  # the norms' scales are sliced, which is cheap
    assert not sliced & one_layer
