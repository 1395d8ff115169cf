"""The shipped set of resolved questions, and the loader's checks of the format."""

import json

import pytest

from foresight_lab.forecasting.questions import load_questions


def test_the_shipped_set_has_at_least_50_well_formed_questions():
    questions = load_questions()
    assert len(questions) >= 50
    kinds = {q.answer_type for q in questions}
    assert kinds == {"binary", "multiple_choice"}
    binary = [q for q in questions if q.answer_type == "binary"]
    assert 0.2 < sum(q.resolution for q in binary) / len(binary) < 0.8  # both outcomes occur
    for q in questions:
        assert q.question.endswith("?") and q.open_date <= q.resolve_date
        if q.answer_type == "multiple_choice":
            assert q.resolution in q.options


@pytest.mark.parametrize(
    "row, message",
    [
        (dict(answer_type="binary", resolution=2), "binary resolution is 0 or 1"),
        (dict(answer_type="ranking"), "answer_type must be one of"),
        (
            dict(answer_type="multiple_choice", options={"A": "x", "B": "y"}, resolution="C"),
            "not one of the option labels",
        ),
        (dict(open_date="2024-02-30"), "ISO dates"),
        (dict(resolve_date="2019-01-01"), "before open_date"),
    ],
)
def test_a_malformed_row_names_its_line_and_problem(tmp_path, row, message):
    good = dict(
        id="q",
        question="Will it?",
        answer_type="binary",
        resolution=1,
        open_date="2020-01-01",
        resolve_date="2020-02-01",
    )
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({**good, "id": "ok"}) + "\n" + json.dumps({**good, **row}) + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_questions(path)
    assert "line 2" in str(error.value)


def test_duplicate_ids_are_refused(tmp_path):
    row = dict(
        id="q",
        question="Will it?",
        answer_type="binary",
        resolution=0,
        open_date="2020-01-01",
        resolve_date="2020-01-02",
    )
    path = tmp_path / "q.jsonl"
    path.write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(ValueError, match="duplicate id"):
        load_questions(path)
