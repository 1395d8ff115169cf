"""The playground's logic, driven headless: set the widgets, press the button, read them."""

import pytest

from foresight_lab.widgets import CHART_TOKENS, Playground


@pytest.fixture
def playground(tiny_lab):
    return tiny_lab.playground("hello world")


def test_generate_streams_each_choice_into_its_box(tiny_lab, playground):
    playground.temperature.value = 0.9
    playground.top_k.value = 40
    playground.seed.value = 3
    playground.n.value = 2
    playground.max_tokens.value = 12
    playground.run_button.click()
    expected = tiny_lab.generate(
        "hello world", temperature=0.9, top_k=40, seed=3, n=2, max_tokens=12
    )
    assert [box.value for box in playground.answers.children] == [c.text for c in expected.choices]
    assert playground.position.max == 12
    assert "12 tokens" in playground.status.value


def test_the_chart_shows_the_next_token_probabilities_at_a_position(tiny_lab, playground):
    playground.temperature.value = 0.0
    playground.max_tokens.value = 5
    playground.run()
    generated = tiny_lab.generate("hello world", temperature=0, max_tokens=5).token_ids
    playground.position.value = 2  # redraws through the observer
    assert playground.chart.value.count("<tr>") == CHART_TOKENS + 1
    assert "◀ chosen" in playground.chart.value  # greedy picked the top token
    expected = tiny_lab.next_token_distribution(tiny_lab.tokenize("hello world") + generated[:2])
    top_text = expected.top(1)[0][0]
    assert repr(top_text).replace("'", "&#x27;") in playground.chart.value


def test_changing_a_sampling_slider_redraws_the_kept_count(playground):
    playground.max_tokens.value = 3
    playground.run()
    playground.top_k.value = 7
    assert "kept: 7" in playground.chart.value


def test_chat_mode_uses_the_models_template(tiny_lab, playground):
    playground.chat.value = True
    playground.temperature.value = 0.0
    playground.max_tokens.value = 4
    playground.run()
    expected = tiny_lab.chat(
        [{"role": "user", "content": "hello world"}], temperature=0, max_tokens=4
    )
    assert playground.answers.children[0].value == expected.text


def test_a_request_the_engine_refuses_shows_its_message(playground):
    playground.max_tokens.value = 512  # beyond the tiny engine's 256-token context
    playground.run()
    assert "max_tokens" in playground.status.value


def test_it_builds_a_widget_tree(playground):
    assert isinstance(playground, Playground)
    assert playground.widget.children[0] is playground.prompt
