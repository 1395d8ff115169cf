"""Resolved forecasting questions: the format, and the set that ships with the toolkit.

One JSON object per line (JSONL):

    {"id": "brexit-2016",
     "question": "Will the United Kingdom vote to leave the European Union ...?",
     "answer_type": "binary",              # or "multiple_choice"
     "options": {"A": "...", "B": "..."},  # multiple choice only: label -> option
     "resolution": 1,                      # binary: 1 (yes) or 0 (no); multiple choice: a label
     "open_date": "2016-06-01",            # when the question is asked (ISO date)
     "resolve_date": "2016-06-24",         # when the outcome was known
     "topic": "politics"}

The shipped set (`resolved_questions.jsonl`, written for this project) asks about
public events of 2016 to 2025 whose outcomes are settled; a model trained after them
may simply remember the answers, so treat scores on it as a smoke test of the pipeline,
not as a measure of foresight.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib

SHIPPED = pathlib.Path(__file__).parent / "data" / "resolved_questions.jsonl"
ANSWER_TYPES = ("binary", "multiple_choice")


@dataclasses.dataclass(frozen=True)
class ResolvedQuestion:
    id: str
    question: str
    answer_type: str
    resolution: int | str
    open_date: datetime.date
    resolve_date: datetime.date
    options: dict[str, str] | None = None
    topic: str | None = None


def _parse(row: dict, where: str) -> ResolvedQuestion:
    def fail(message: str):
        raise ValueError(f"{where}: {message}")

    for field in ("id", "question", "answer_type", "resolution", "open_date", "resolve_date"):
        if field not in row:
            fail(f"missing field {field!r}")
    kind = row["answer_type"]
    if kind not in ANSWER_TYPES:
        fail(f"answer_type must be one of {ANSWER_TYPES}, got {kind!r}")
    options = row.get("options")
    if kind == "binary" and row["resolution"] not in (0, 1):
        fail(f"a binary resolution is 0 or 1, got {row['resolution']!r}")
    if kind == "multiple_choice":
        if not isinstance(options, dict) or len(options) < 2:
            fail("a multiple-choice question needs 'options', a dict of at least two labels")
        if row["resolution"] not in options:
            fail(
                f"resolution {row['resolution']!r} is not one of the option labels {list(options)}"
            )
    try:
        opened = datetime.date.fromisoformat(row["open_date"])
        resolved = datetime.date.fromisoformat(row["resolve_date"])
    except (TypeError, ValueError):
        fail("open_date and resolve_date must be ISO dates (YYYY-MM-DD)")
    if resolved < opened:
        fail("resolve_date is before open_date")
    return ResolvedQuestion(
        id=row["id"],
        question=row["question"],
        answer_type=kind,
        resolution=row["resolution"],
        open_date=opened,
        resolve_date=resolved,
        options=options,
        topic=row.get("topic"),
    )


def load_questions(path: str | pathlib.Path | None = None) -> list[ResolvedQuestion]:
    """Reads resolved questions from a JSONL file (the shipped set by default)."""
    path = pathlib.Path(path) if path is not None else SHIPPED
    questions, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from error
        question = _parse(row, where)
        if question.id in seen:
            raise ValueError(f"{where}: duplicate id {question.id!r}")
        seen.add(question.id)
        questions.append(question)
    return questions
