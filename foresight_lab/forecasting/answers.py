"""Foresight's answer types: names, options, and the machine-readable answer tags.

The content of a forecast ends with its answer, exactly as the hosted API writes it:

    binary           <answer>0.62</answer>
    continuous       <answer>{"mean": 41.0, "standard_deviation": 3.5}</answer>
    multiple choice  <options>{"A": "Rate cut", "B": "Hold"}</options><answer>{"A": 0.28, "B": 0.72}</answer>
    free response    <answer>text</answer>

This module formats and parses those tags, reads the options of a multiple-choice
question, and decides the type of a question for `answer_type="auto"`. It knows
nothing of models: `forecast.py` fills the numbers in from the model's distribution.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping, Sequence

from foresight_lab.engine.request import InvalidRequestError

BINARY = "binary"
MULTIPLE_CHOICE = "multiple_choice"
CONTINUOUS = "continuous"
FREE_RESPONSE = "free_response"
AUTO = "auto"
ANSWER_TYPES = (BINARY, MULTIPLE_CHOICE, CONTINUOUS, FREE_RESPONSE, AUTO)
REASONING_EFFORTS = ("low", "medium", "high")
DECIMALS = 4  # probabilities in the content; the Python results keep full precision

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPTIONS = re.compile(r"<options>(.*?)</options>", re.DOTALL)
# "A) Rate cut", "(B) Hold", "C. Hike", "D: Other"
_LETTERED = re.compile(r"^\s*\(?([A-Z])[).:]\s+(\S.*?)\s*$")
_BULLETED = re.compile(r"^\s*[-*•]\s+(\S.*?)\s*$")
_JSON_LIST = re.compile(r"\[\s*\".*?\"\s*\]", re.DOTALL)
# The auxiliary verbs that open a yes/no question.
_YES_NO = re.compile(
    r"^(will|would|is|are|was|were|does|do|did|can|could|has|have|had|should|shall|may|might)\b",
    re.IGNORECASE,
)
_CHANCE = re.compile(r"\b(probability|chance|likelihood|odds) (that|of)\b", re.IGNORECASE)
_QUANTITY = re.compile(
    r"\b(how (many|much|high|low|long|large|far)|what (will|would) be the (number|value|price|"
    r"level|rate|percentage|share|count|total|amount)|what (number|percentage|price|value|"
    r"level|share|fraction)|by how much)\b",
    re.IGNORECASE,
)


def answer_type(value: str | None, param: str = "answer_type") -> str | None:
    """The canonical name of an answer type (any letter case, or an Enum of one)."""
    if value is None:
        return None
    value = getattr(value, "value", value)
    if not isinstance(value, str) or value.strip().lower() not in ANSWER_TYPES:
        raise InvalidRequestError(
            f"{param}: must be one of {', '.join(ANSWER_TYPES)} (any letter case), got {value!r}",
            param,
        )
    return value.strip().lower()


def reasoning_effort(value: str | None, param: str = "reasoning_effort") -> str:
    """low, medium or high (any letter case); None is low: no thinking."""
    if value is None:
        return "low"
    value = getattr(value, "value", value)
    if not isinstance(value, str) or value.strip().lower() not in REASONING_EFFORTS:
        raise InvalidRequestError(
            f"{param}: must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}", param
        )
    return value.strip().lower()


def options_from(value, param: str = "options") -> dict[str, str] | None:
    """Options as given by a caller: a list of texts (labelled A, B, ...) or a dict of
    label -> text."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        options = {str(k): v for k, v in value.items()}
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) > len(string.ascii_uppercase):
            raise InvalidRequestError(f"{param}: at most 26 options, got {len(value)}", param)
        options = dict(zip(string.ascii_uppercase, value, strict=False))
    else:
        raise InvalidRequestError(
            f"{param}: must be a list of option texts or an object of label -> text", param
        )
    if len(options) < 2:
        raise InvalidRequestError(f"{param}: a multiple-choice question needs two options", param)
    for label, text in options.items():
        if not isinstance(text, str) or not text.strip() or not label.strip():
            raise InvalidRequestError(
                f"{param}: each option needs a label and a non-empty text, got {label!r}: {text!r}",
                param,
            )
    return options


def options_in(question: str) -> dict[str, str] | None:
    """The options a question lists, if it does: lines `A) ...` (or `(A)`, `A.`, `A:`),
    bullet lines `- ...` (labelled A, B, ... in order), or a JSON list of strings."""
    lines = question.splitlines()
    lettered = [m.groups() for m in map(_LETTERED.match, lines) if m]
    if len(lettered) >= 2 and len({label for label, _ in lettered}) == len(lettered):
        return dict(lettered)
    bulleted = [m.group(1) for m in map(_BULLETED.match, lines) if m]
    if 2 <= len(bulleted) <= 26:
        return dict(zip(string.ascii_uppercase, bulleted, strict=False))
    for candidate in _JSON_LIST.findall(question):
        try:
            texts = json.loads(candidate)
        except ValueError:
            continue
        if 2 <= len(texts) <= 26 and all(isinstance(t, str) and t.strip() for t in texts):
            return dict(zip(string.ascii_uppercase, texts, strict=False))
    return None


def classify(question: str, options: Mapping[str, str] | None = None) -> str:
    """The answer type `auto` picks: multiple choice when there are options; continuous
    for a question about a quantity ("how many", "what will be the price"); binary for a
    yes/no question ("Will ...?", "..., is ...?", "the chance that ..."); free response
    otherwise. A rule of thumb on the question's words, not the model's judgement."""
    if options or options_in(question):
        return MULTIPLE_CHOICE
    text = question.strip()
    if _QUANTITY.search(text):
        return CONTINUOUS
    clauses = re.split(r"[,;:]\s+|(?<=[.!?])\s+", text)
    if any(_YES_NO.match(c) for c in clauses) or _CHANCE.search(text):
        return BINARY
    return FREE_RESPONSE


# ---- the tags -------------------------------------------------------------------------


def _number(value: float) -> float:
    return round(float(value), DECIMALS)


def binary_tag(probability: float) -> str:
    return f"<answer>{_number(probability)}</answer>"


def multiple_choice_tag(options: Mapping[str, str], probabilities: Mapping[str, float]) -> str:
    shown = {label: _number(p) for label, p in probabilities.items()}
    return (
        f"<options>{json.dumps(dict(options), ensure_ascii=False)}</options>"
        f"<answer>{json.dumps(shown)}</answer>"
    )


def continuous_tag(mean: float, standard_deviation: float) -> str:
    value = {"mean": float(mean), "standard_deviation": float(standard_deviation)}
    return f"<answer>{json.dumps(value)}</answer>"


def free_response_tag(text: str) -> str:
    return f"<answer>{text}</answer>"


def parse_answer(content: str, kind: str) -> dict | None:
    """The answer a content string ends with, as `{"answer_type": ..., fields}`; None
    when it carries no readable answer. `kind` may be `auto`: the tags then say which."""
    found = _ANSWER.findall(content or "")
    if not found:
        return None
    raw = found[-1].strip()
    options_match = _OPTIONS.findall(content)
    try:
        if kind in (BINARY, AUTO):
            try:
                probability = float(raw)
            except ValueError:
                if kind == BINARY:
                    return None
            else:
                return {"answer_type": BINARY, "probability": probability}
        if kind == FREE_RESPONSE:
            return {"answer_type": FREE_RESPONSE, "text": raw}
        try:
            value = json.loads(raw)
        except ValueError:
            return {"answer_type": FREE_RESPONSE, "text": raw} if kind == AUTO else None
        if kind in (CONTINUOUS, AUTO) and isinstance(value, dict) and "mean" in value:
            return {
                "answer_type": CONTINUOUS,
                "mean": float(value["mean"]),
                "standard_deviation": float(value["standard_deviation"]),
            }
        if kind in (MULTIPLE_CHOICE, AUTO) and isinstance(value, dict):
            options = json.loads(options_match[-1]) if options_match else None
            probabilities = {str(k): float(v) for k, v in value.items()}
            return {
                "answer_type": MULTIPLE_CHOICE,
                "probabilities": probabilities,
                "options": options,
            }
    except (KeyError, TypeError, ValueError):
        return None
    return None


def normalized(logprobs: Sequence[float]) -> list[float]:
    """Probabilities proportional to exp(logprob), summing to one (a stable softmax)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]
