"""Forecasts: answer types and their tags, options, research, and probabilities read
from the model's own distribution (on the tiny random model; the real one in
test_real_model.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from foresight_lab.engine.request import InvalidRequestError
from foresight_lab.forecasting import answers
from foresight_lab.forecasting.forecast import Forecaster, ForecastRequest
from foresight_lab.forecasting.research import DocumentSource, Sources

# ---- answer types, options, tags ------------------------------------------------------------


@pytest.mark.parametrize("value", ["binary", "BINARY", "Binary", " multiple_choice ", "AUTO"])
def test_answer_types_are_read_in_any_letter_case(value):
    assert answers.answer_type(value) == value.strip().lower()


@pytest.mark.parametrize("value", ["yes_no", "", "multiple choice", 3, ["binary"]])
def test_an_unknown_answer_type_names_the_field_and_the_choices(value):
    with pytest.raises(InvalidRequestError) as raised:
        answers.answer_type(value)
    assert raised.value.param == "answer_type"
    assert "binary, multiple_choice, continuous, free_response, auto" in str(raised.value)


@pytest.mark.parametrize("value", ["extreme", "minimal", 2])
def test_an_unknown_reasoning_effort_is_refused(value):
    with pytest.raises(InvalidRequestError) as raised:
        answers.reasoning_effort(value)
    assert raised.value.param == "reasoning_effort"


def test_options_are_read_from_lettered_lines_bullets_or_a_json_list():
    lettered = "Which?\nA) Rate cut\nB) Hold\nC) Hike"
    assert answers.options_in(lettered) == {"A": "Rate cut", "B": "Hold", "C": "Hike"}
    assert answers.options_in("Which?\n(A) Up\n(B) Down") == {"A": "Up", "B": "Down"}
    assert answers.options_in("Which?\n- Up\n- Down") == {"A": "Up", "B": "Down"}
    assert answers.options_in('Which of ["Up", "Down"]?') == {"A": "Up", "B": "Down"}
    assert answers.options_in("Will it rain?") is None
    assert answers.options_from(["x", "y"]) == {"A": "x", "B": "y"}
    assert answers.options_from({"1": "x", "2": "y"}) == {"1": "x", "2": "y"}
    with pytest.raises(InvalidRequestError, match="two options"):
        answers.options_from(["only one"])


@pytest.mark.parametrize(
    "question, kind",
    [
        ("Will the Fed cut rates in March 2026?", "binary"),
        ("Given the news, is a recession likely by 2027?", "binary"),
        ("How many seats will the party win?", "continuous"),
        ("What will be the price of gold on June 1?", "continuous"),
        ("Who will win?\nA) Ann\nB) Bob", "multiple_choice"),
        ("Why did the bill fail?", "free_response"),
    ],
)
def test_auto_decides_the_type_from_the_question(question, kind):
    assert answers.classify(question) == kind


def test_the_tags_read_back_as_they_were_written():
    options = {"A": "Rate cut", "B": "Hold"}
    content = "Prose first. " + answers.multiple_choice_tag(options, {"A": 0.28, "B": 0.72})
    assert content.endswith(
        '<options>{"A": "Rate cut", "B": "Hold"}</options><answer>{"A": 0.28, "B": 0.72}</answer>'
    )
    assert answers.parse_answer(content, "multiple_choice")["probabilities"] == {
        "A": 0.28,
        "B": 0.72,
    }
    assert answers.binary_tag(0.623456) == "<answer>0.6235</answer>"
    assert answers.parse_answer("<answer>0.62</answer>", "auto") == {
        "answer_type": "binary",
        "probability": 0.62,
    }
    continuous = answers.continuous_tag(41.0, 3.5)
    assert continuous == '<answer>{"mean": 41.0, "standard_deviation": 3.5}</answer>'
    assert answers.parse_answer(continuous, "auto")["standard_deviation"] == 3.5
    assert answers.parse_answer("<answer>soon</answer>", "free_response")["text"] == "soon"
    assert answers.parse_answer("no tags", "binary") is None
    assert answers.parse_answer("<answer>maybe</answer>", "binary") is None


# ---- research -----------------------------------------------------------------------------


DOCUMENTS = [
    {
        "url": "https://example.org/fed",
        "title": "Fed minutes",
        "text": "The Federal Reserve "
        "signalled it will cut interest rates in March as inflation fell.",
    },
    {"url": "https://example.org/cats", "title": "Cats", "text": "Cats sleep most of the day."},
    {"url": "https://example.org/rain", "title": "Weather", "text": "Rain is likely in London."},
]


def test_documents_are_ranked_against_the_question_with_bm25():
    found = DocumentSource(DOCUMENTS)("Will the Fed cut interest rates?", 2)
    assert [p.title for p in found] == ["Fed minutes"]  # Cats share only "the", no matter
    assert DocumentSource(DOCUMENTS)("Federal Reserve", 3) == found[:1]  # no overlap: left out
    assert DocumentSource(DOCUMENTS)("Will it rain in London?", 3)[0].title == "Weather"


def test_local_files_are_sources(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("Paris hosts the 2024 Olympic Games.\n\n" + "filler words " * 200)
    [first, *_] = DocumentSource([path])("Where are the Olympic Games?", 1)
    assert first.url == path.resolve().as_uri() and first.title == "notes.md"
    assert first.text.startswith("Paris hosts")


def test_research_names_must_be_registered():
    sources = Sources()
    with pytest.raises(InvalidRequestError, match="no research sources are registered"):
        sources.chosen(True)
    sources.add("notes", DOCUMENTS)
    sources.add("search", lambda query, k: [{"url": "u", "title": "t", "text": query}])
    assert sources.chosen(True) == ["notes", "search"]
    assert sources.chosen({"sources": ["search"]}) == ["search"]
    assert sources.chosen(False) == [] and sources.chosen(None) == []
    with pytest.raises(InvalidRequestError, match="unknown source 'web'") as raised:
        sources.chosen({"sources": ["web"]})
    assert raised.value.param == "research.sources"
    with pytest.raises(InvalidRequestError, match="research"):
        sources.chosen("yes")
    assert sources.retrieve("hello", ["search"])[0].text == "hello"


# ---- forecasts on the tiny model ------------------------------------------------------------


def _forecast(lab, question, **fields):
    request = ForecastRequest.build(
        [{"role": "user", "content": question}], lab.forecaster.sources, **fields
    )
    run = lab.forecaster.run(request)
    return run, run.finish()


def _answer_probabilities(lab, prompt: str, answers_: list[str]) -> np.ndarray:
    """The answers' first-token probabilities, normalized, from the model's own next-token
    distribution by a separate path (one full forward pass, without the engine's cache or
    scheduler). A leading space the tiny vocabulary keeps apart belongs to the prompt."""
    encoded = [lab.tokenizer.encode(a, add_special_tokens=False) for a in answers_]
    space = lab.tokenizer.encode(" ", add_special_tokens=False)
    shared = space if all(e[: len(space)] == space and len(e) > len(space) for e in encoded) else []
    prompt_ids = lab.forecaster.tokenize(prompt) + shared
    distribution = lab.next_token_distribution(prompt_ids).model
    chances = np.asarray([distribution[e[len(shared)]] for e in encoded], np.float64)
    return chances / chances.sum()


def test_binary_is_the_normalized_yes_no_probability_of_the_models_logits(tiny_lab):
    run, result = _forecast(tiny_lab, "Will it rain tomorrow?", answer_type="binary")
    assert run.answer_prompt.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\nAnswer:")
    expected, _ = _answer_probabilities(tiny_lab, run.answer_prompt, [" Yes", " No"])
    assert result.binary.probability == pytest.approx(expected, abs=1e-5)
    assert result.content == f"<answer>{round(result.binary.probability, 4)}</answer>"
    assert result.answer_type == "binary" and result.thinking is None
    assert result.usage.prompt_tokens == len(tiny_lab.forecaster.tokenize(run.prompt))


def test_multiple_choice_normalizes_the_option_labels(tiny_lab):
    question = "Who will win?\n- Ann\n- Bob\n- Cy"
    run, result = _forecast(tiny_lab, question, answer_type="Multiple_Choice")
    assert "A) Ann\nB) Bob\nC) Cy" in run.prompt  # bullets are lettered for the model
    expected = _answer_probabilities(tiny_lab, run.answer_prompt, [" A", " B", " C"])
    prediction = result.multiple_choice
    assert list(prediction.probabilities) == ["Ann", "Bob", "Cy"]
    np.testing.assert_allclose(list(prediction.by_label().values()), expected, atol=1e-5)
    assert math.isclose(sum(prediction.probabilities.values()), 1.0)
    assert result.content.startswith(
        '<options>{"A": "Ann", "B": "Bob", "C": "Cy"}</options><answer>'
    )


def test_multiple_choice_needs_options(tiny_lab):
    with pytest.raises(InvalidRequestError) as raised:
        _forecast(tiny_lab, "Who will win?", answer_type="multiple_choice")
    assert raised.value.param == "options"
    run, result = _forecast(
        tiny_lab, "Who will win?", answer_type="multiple_choice", options=["Ann", "Bob"]
    )
    assert set(result.multiple_choice.probabilities) == {"Ann", "Bob"}


def test_the_same_seed_gives_the_same_forecast_and_thinking(tiny_lab):
    ask = dict(answer_type="binary", reasoning_effort="medium", temperature=1.0)
    _, first = _forecast(tiny_lab, "Will it rain tomorrow?", seed=11, **ask)
    _, again = _forecast(tiny_lab, "Will it rain tomorrow?", seed=11, **ask)
    _, other = _forecast(tiny_lab, "Will it rain tomorrow?", seed=12, **ask)
    assert first.thinking and first.content == again.content and first.thinking == again.thinking
    assert other.thinking != first.thinking
    assert first.usage.completion_tokens > 1  # the thinking counts


def test_thinking_goes_before_the_answer(tiny_lab):
    run, result = _forecast(
        tiny_lab, "Will it rain?", answer_type="binary", reasoning_effort="high", seed=3
    )
    assert "step by step" in run.prompt
    read = run.answer_prompt.removeprefix(run.prompt + "Let me think step by step.\n")
    read = read.removesuffix("\n\nAnswer:")
    assert read and result.thinking.startswith(read)  # cut only where the context ends


def test_a_native_thinking_format_is_used_where_the_template_has_one(tiny_lab):
    forecaster = Forecaster(tiny_lab.engine)
    forecaster.native_thinking = True  # as for Qwen3, whose template knows <think>
    request = ForecastRequest.build(
        [{"role": "user", "content": "Will it rain?"}],
        forecaster.sources,
        answer_type="binary",
        reasoning_effort="medium",
        seed=5,
    )
    run = forecaster.run(request)
    result = run.finish()
    assert "step by step" not in run.prompt
    read = run.answer_prompt.removeprefix(f"{run.prompt}<think>\n")
    assert read.endswith("\n</think>\n\nAnswer:")
    assert result.thinking.startswith(read.removesuffix("\n</think>\n\nAnswer:"))
    quiet = forecaster.run(dataclasses_replace(request, reasoning_effort="low"))
    quiet.finish()
    assert quiet.answer_prompt == f"{quiet.prompt}<think>\n\n</think>\n\nAnswer:"


def dataclasses_replace(request, **changes):
    import dataclasses

    return dataclasses.replace(request, **changes)


def test_continuous_is_the_mean_and_spread_of_seeded_samples(tiny_lab):
    question = "How many people will attend?"
    _, result = _forecast(tiny_lab, question, answer_type="continuous", seed=2)
    _, again = _forecast(tiny_lab, question, answer_type="continuous", seed=2)
    prediction = result.continuous
    assert prediction is not None, result.content
    assert prediction.mean == pytest.approx(np.mean(prediction.samples))
    if len(prediction.samples) > 1:
        assert prediction.standard_deviation == pytest.approx(np.std(prediction.samples, ddof=1))
    assert again == result or (
        again.continuous == result.continuous and again.content == result.content
    )


def test_free_response_wraps_the_reply(tiny_lab):
    _, result = _forecast(tiny_lab, "Why?", answer_type="free_response", seed=4, max_tokens=8)
    assert result.content == f"<answer>{result.free_response.text}</answer>"
    assert result.usage.completion_tokens <= 8


def test_research_puts_passages_in_the_prompt_and_returns_the_sources(tiny_lab):
    short = [  # the tiny vocabulary spends a token per letter: keep the context small
        {"url": "https://example.org/fed", "title": "Fed", "text": "Fed cuts rates."},
        {"url": "https://example.org/cat", "title": "Cat", "text": "Cats nap."},
    ]
    tiny_lab.add_source("notes", short)
    try:
        run, result = _forecast(tiny_lab, "Fed cuts?", answer_type="binary", research=True)
    finally:
        tiny_lab.forecaster.sources.remove("notes")
    assert (
        "Background from research:\n[1] Fed (https://example.org/fed)\nFed cuts rates."
        in run.prompt
    )
    assert "Cats" not in run.prompt
    assert [(s.url, s.title) for s in result.sources] == [("https://example.org/fed", "Fed")]


def test_lab_forecast_takes_the_sdk_arguments(tiny_lab):
    result = tiny_lab.forecast("Will it rain?", answer_type="BINARY", seed=1)
    assert 0 < result.binary.probability < 1 and result.model == tiny_lab.name
    with pytest.raises(InvalidRequestError, match="question"):
        tiny_lab.forecast("")
    with pytest.raises(InvalidRequestError, match="answer_type"):
        tiny_lab.forecast("Will it rain?", answer_type="probability")
