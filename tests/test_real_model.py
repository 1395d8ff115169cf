"""The real SmolLM2-135M-Instruct GGUF, read by this project, against transformers on PyTorch."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from foresight_lab.engine.request import SamplingOptions
from tests.conftest import logprob_trace, recording_calls, run_concurrently

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def torch_model(smollm2_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


def torch_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Plain argmax decoding, whatever the token (EOS included), with PyTorch."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers_token_for_token(smollm2_lab, torch_model, prompt):
    prompt_ids = smollm2_lab.tokenize(prompt)
    out = smollm2_lab.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
    assert out.token_ids == torch_greedy(torch_model, prompt_ids, 32)


def test_chat_reply_through_the_template_is_sensible_english(smollm2_lab):
    reply = smollm2_lab.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=48,
    )
    assert reply.finish_reason == "stop"  # the model ended its turn with <|im_end|>
    assert "Paris" in reply.text
    words = reply.text.split()
    assert len(words) >= 3 and all(w.strip(".,!'\"").isalpha() for w in words[:5])


def test_the_chat_template_is_the_models_own(smollm2_lab):
    assert "<|im_start|>" in smollm2_lab.model.chat_template
    assert smollm2_lab.tokenizer.convert_ids_to_tokens(sorted(smollm2_lab.model.eos_token_ids)) == [
        "<|im_end|>"
    ]


def test_our_gguf_tokenizer_is_the_one_transformers_builds(smollm2_path):
    """The tokenizer is built without transformers' PyTorch-based GGUF reader, saved in
    the cache and loaded from there without transformers; each must equal what
    transformers itself builds from the file."""
    from foresight_lab.tokenizer import load_tokenizer, tokenizer_from_gguf

    reference = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )
    load_tokenizer(smollm2_path)  # saves it, if no earlier load did
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Héllo 🙂, what is 2+2?"},
    ]
    for tokenizer in (tokenizer_from_gguf(smollm2_path), load_tokenizer(smollm2_path)):
        assert tokenizer.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
        for text in [
            "The capital of France is",
            " naïve café — 東京 🙂\n\tend",
            "<|im_start|>user",
        ]:
            assert tokenizer.encode(text) == reference.encode(text)
            assert tokenizer.decode(reference.encode(text)) == text
        for prompt in (False, True):
            assert tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            ) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
        assert tokenizer.all_special_ids == reference.all_special_ids
        assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (
            reference.eos_token_id,
            reference.bos_token_id,
        )


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
def test_loading_imports_no_pytorch_and_leaves_the_file_unmapped(smollm2_path, tmp_path):
    """A server's memory: the GGUF's pages are not kept resident through a view of its
    memory map, and the tokenizer does not pull in PyTorch (installed here for tests),
    neither when it is first built nor when its saved copy is loaded; loading the saved
    copy, in a process of its own, does not import transformers either."""
    script = (
        "import sys\n"
        "from foresight_lab.weights.loader import load_model\n"
        "for _ in range(int(sys.argv[1])):\n"
        f"    model = load_model({str(smollm2_path)!r}, progress=False)\n"
        "assert 'torch' not in sys.modules, 'PyTorch was imported'\n"
        f"assert {smollm2_path.name!r} not in open('/proc/self/maps').read(), 'still mapped'\n"
        "print('transformers' in sys.modules)\n"
    )
    env = {**os.environ, "FORESIGHT_LAB_CACHE": str(tmp_path)}
    imported = []
    for loads in ("2", "1"):  # builds and saves the tokenizer, then loads the saved copy
        done = subprocess.run(
            [sys.executable, "-c", script, loads], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        imported.append(done.stdout.split()[-1])
    assert imported == ["True", "False"]


def test_the_header_skips_only_the_tokenizers_arrays(smollm2_path):
    from foresight_lab.weights.gguf import open_gguf, read_header

    metadata, tensors, _ = read_header(smollm2_path)
    reader = open_gguf(smollm2_path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    skipped = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}
    assert set(fields) - set(metadata) == skipped
    assert metadata == {k: f.contents() for k, f in fields.items() if k not in skipped}
    assert sorted(tensors) == sorted(t.name for t in reader.tensors)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_the_files_pages_are_handed_back_as_its_tensors_are_read(smollm2_path):
    """Reading the weights keeps at most a few tensors' worth of the 98 MB file resident
    at a time (each is copied out, then its pages are handed back)."""
    script = (
        "import re, sys\n"
        "from foresight_lab.weights.gguf import read_gguf\n"
        "def file_mb():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(re.search(r'RssFile:\\s+(\\d+)', status).group(1)) / 1024\n"
        "before, seen = file_mb(), []\n"
        "read_gguf(sys.argv[1], on_tensor=lambda name: seen.append(file_mb()))\n"
        "print(max(seen) - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 30  # the largest tensor is 27 MB


def test_streamed_pieces_never_split_a_character(smollm2_lab):
    """The reply's emoji spans several byte tokens; no piece may hold half of it."""
    messages = [{"role": "user", "content": "Write three emoji that describe happiness."}]
    sampling = dict(temperature=0, max_tokens=24)
    pieces = list(smollm2_lab.chat(messages, stream=True, **sampling))
    whole = smollm2_lab.chat(messages, **sampling)
    split_tokens = [t for t in whole.token_ids if "\ufffd" in smollm2_lab.detokenize([t])]
    assert split_tokens, "the reply should contain a character spread over several tokens"
    assert "".join(pieces) == whole.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any(ord(c) > 0xFFFF for c in whole.text)  # an emoji outside the BMP


@pytest.mark.parametrize(
    "lab_name, tolerance",
    [
        # float32 weights and cache: PyTorch's numbers but for the order of sums.
        ("float32_lab", 1e-4),
        # The default: weights in their blocks, keys and values rounded to float16,
        # which moves this probability by about 8e-4 (0.2367 against 0.2375).
        ("smollm2_lab", 2e-3),
    ],
)
def test_a_binary_forecast_is_the_yes_no_odds_of_pytorchs_logits(
    request, lab_name, tolerance, torch_model
):
    from foresight_lab.forecasting.forecast import ForecastRequest

    lab = request.getfixturevalue(lab_name)
    question = [{"role": "user", "content": "Will it rain in London tomorrow?"}]
    forecast = ForecastRequest.build(question, lab.forecaster.sources, answer_type="binary")
    run = lab.forecaster.run(forecast)
    result = run.finish()
    prompt_ids = lab.forecaster.tokenize(run.answer_prompt)
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt_ids])).logits[0, -1].double()
    probabilities = torch.softmax(logits, -1)
    yes, no = (lab.tokenize(t, add_special_tokens=False) for t in (" Yes", " No"))
    assert len(yes) == len(no) == 1  # one token each in this vocabulary
    expected = probabilities[yes[0]] / (probabilities[yes[0]] + probabilities[no[0]])
    assert result.binary.probability == pytest.approx(float(expected), abs=tolerance)


def test_scoring_a_long_prompt_forms_no_vocabulary_sized_temporaries(smollm2_lab):
    """A 512-token chunk's logprobs (echo, forecast scoring): XLA's own count of the
    temporaries stays under one [P, V] array of logits (100 MB here); the embedding is
    never dequantized whole (108 MB)."""
    import jax

    scheduler = smollm2_lab.engine._scheduler
    hidden = jax.ShapeDtypeStruct((1, 512, smollm2_lab.model.config.hidden_size), np.float32)
    targets = jax.ShapeDtypeStruct((1, 512), np.int32)
    compiled = scheduler.steps.prompt_logprobs.jitted.lower(
        scheduler.params, hidden, targets
    ).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 16 << 20


@pytest.fixture(scope="module")
def float32_lab():
    """The same GGUF dequantized to float32 in memory, with a float32 KV cache: the
    reference of the default path (weights in their blocks, a float16 cache)."""
    import foresight_lab as fl

    lab = fl.load(
        "smollm2-135m",
        max_slots=4,
        max_cache_length=512,
        kv_cache_dtype="float32",
        progress=False,
        quantized=False,
    )
    yield lab
    lab.engine.shutdown()


def test_weights_stay_in_their_gguf_blocks_in_memory(smollm2_lab, smollm2_path, float32_lab):
    import jax

    from foresight_lab.models.quantized import QuantizedMatrix

    def nbytes(lab):
        leaves = jax.tree.leaves(lab.engine._scheduler.params)
        return sum(leaf.nbytes for leaf in leaves)

    q_proj = smollm2_lab.model.params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, QuantizedMatrix) and q_proj.kind == "q4_1"
    # Stacked over the layers: [L, N, K/2].
    assert q_proj.values.shape == (smollm2_lab.model.config.num_layers, 576, 288)
    assert isinstance(smollm2_lab.model.params["embed"]["embedding"], QuantizedMatrix)
    file_size = smollm2_path.stat().st_size
    # Q4_1 blocks split into arrays keep their 20 bytes a block; the file also holds
    # the tokenizer, so the weights are a little smaller than it.
    assert nbytes(smollm2_lab) <= file_size
    assert nbytes(float32_lab) > 4 * file_size


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_of_quantized_weights_equals_the_float32_path(
    smollm2_lab, float32_lab, prompt
):
    """Weights in their blocks and a float16 cache against float32 weights and cache.
    Decode with 1 and with 4 rows (n=4) runs the CPU kernels; prefill the references."""
    expected = float32_lab.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
    alone = smollm2_lab.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
    four = smollm2_lab.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True, n=4)
    assert alone.token_ids == expected.token_ids
    assert [c.token_ids for c in four.choices] == [expected.token_ids] * 4


@pytest.fixture(scope="module")
def lab_8_bits():
    import foresight_lab as fl

    lab = fl.load(
        "smollm2-135m", max_slots=4, max_cache_length=512, progress=False, activation_bits=8
    )
    yield lab
    lab.engine.shutdown()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_8_bit_activations_follow_the_float32_path_until_a_near_tie(
    lab_8_bits, float32_lab, prompt
):
    """The inputs of each Q4_1 matmul rounded to 8 bits a block, as llama.cpp rounds
    them, move a token's logprob by up to about 0.3 while the text is the same (16 bits:
    0.005). Greedy text follows the float32 path for 13 to 26 tokens on these prompts,
    then parts at a near tie: a token among the float32 path's alternatives whose logprob
    there is within twice that of its first (0.13 to 0.49 on these prompts)."""
    moved = 0.3
    greedy = dict(max_tokens=32, temperature=0, ignore_eos=True, top_logprobs=5)
    expected = float32_lab.generate(prompt, **greedy).choices[0].logprobs
    got = lab_8_bits.generate(prompt, **greedy).choices[0].logprobs
    pairs = list(zip(got, expected, strict=True))
    same = next((i for i, (a, b) in enumerate(pairs) if a.token_id != b.token_id), len(pairs))
    assert same >= 8
    assert all(abs(a.logprob - b.logprob) < moved for a, b in pairs[:same])
    if same < len(pairs):
        alternatives = {t.token_id: t.logprob for t in expected[same].top_logprobs}
        taken = got[same].token_id
        assert taken in alternatives
        assert alternatives[expected[same].token_id] - alternatives[taken] < 2 * moved


def test_prompts_prefilled_together_give_the_tokens_each_gives_alone(smollm2_lab):
    """Four prompts of 41 to 64 tokens arrive together: one prefill call of four rows of
    64 tokens, on the quantized matmuls' reference path as each takes alone."""
    words = " ".join(f"{PROMPTS[i % 3]} {i}" for i in range(30))
    ids = smollm2_lab.tokenizer.encode(words)
    prompts = [ids[: 41 + 7 * i] for i in range(4)]
    greedy = SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    alone = [logprob_trace(smollm2_lab.engine.submit(p, greedy).result()) for p in prompts]
    with recording_calls(smollm2_lab, "prefill") as calls:
        together = run_concurrently(smollm2_lab, [(p, greedy) for p in prompts])
    assert [args[2].shape for args in calls] == [(4, 64)]
    assert [logprob_trace(r) for r in together] == alone  # to the bit


def test_a_row_decoded_among_15_others_gets_the_bits_it_gets_alone(smollm2_lab):
    """One decode step of 16 rows against the same step of row 0 alone, on a cache of 16
    slots: the sampled token, its logprob and the alternatives, to the bit. XLA's CPU
    backend gave ops of 4096 elements or more to another library (from 8 rows of
    SmolLM2's hidden size up), whose sums round differently; the engine turns that off."""
    from foresight_lab.engine.scheduler import _sampling_params
    from foresight_lab.models.decoder import empty_cache

    engine = smollm2_lab.engine
    steps, vocab = engine._scheduler.steps, engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    scale = 0.5  # keys and values of about a real cache's size
    cache = tuple(
        (rng.standard_normal(a.shape) * scale).astype(a.dtype)
        for a in empty_cache(engine.model.config, 16, 128, engine.config.kv_cache_dtype)
    )
    tokens = rng.integers(0, vocab, 16).astype(np.int32)
    positions = rng.integers(5, 120, 16).astype(np.int32)
    seeds = rng.integers(0, 2**32, (16, 2), dtype=np.uint32)
    samplings = [
        SamplingOptions(temperature=0, logprobs=True, top_logprobs=5),
        SamplingOptions(temperature=0.8, top_p=0.9, logprobs=True, top_logprobs=5),
        SamplingOptions(
            temperature=1.0,
            top_k=40,
            min_p=0.05,
            presence_penalty=0.5,
            logprobs=True,
            top_logprobs=5,
        ),
    ]  # each asks for alternatives: a step computes them only when some row does

    def step(rows: int, mine: SamplingOptions):
        options = {0: mine} | {r: samplings[r % 3] for r in range(1, rows)}
        sampled, *_ = steps.decode(
            engine._scheduler.params,
            tuple(np.copy(a) for a in cache),
            np.ones((16, vocab), np.int32),  # every token generated once: penalties apply
            np.zeros(16, np.int32),
            tokens[:rows],
            positions[:rows],
            _sampling_params(rows, options, vocab),
            seeds[:rows],
            np.zeros(rows, np.int32),
            kv_length=128,
        )
        return [np.asarray(x)[0] for x in jax.tree.leaves(sampled)]

    for mine in samplings:
        for alone, beside in zip(step(1, mine), step(16, mine), strict=True):
            np.testing.assert_array_equal(alone, beside)
