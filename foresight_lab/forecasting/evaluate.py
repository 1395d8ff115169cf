"""Evaluation: resolved questions through a lab or any server of this API, scored.

    evaluation = fl.evaluate(lab)                       # the shipped questions
    evaluation = fl.evaluate("http://127.0.0.1:8000")   # any Foresight-compatible server
    evaluation.summary                                  # Brier, log score, skill, ECE, ...
    evaluation.reliability_diagram()
    report = evaluation.calibrate("platt")              # fitted on half, scored on the rest
    report.before, report.after

Questions go out as their text with the options listed as `A) ...` lines, so that any
server of the API reads them the same way; the answers are read from the
`<answer>` tags of the content (over HTTP) or the typed result (in process).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterable, Sequence

import numpy as np

from foresight_lab.forecasting import answers, metrics
from foresight_lab.forecasting.questions import ResolvedQuestion, load_questions
from foresight_lab.progress import progress_bar

ECE_BINS = 5  # few questions: wide bins


@dataclasses.dataclass(frozen=True)
class Forecasted:
    """One question, its forecast, and how it scored."""

    question: ResolvedQuestion
    probabilities: dict[str, float]  # binary: {"yes": p}; multiple choice: label -> p
    usage_tokens: int = 0

    @property
    def probability_of_outcome(self) -> float:
        q = self.question
        if q.answer_type == answers.BINARY:
            p = self.probabilities["yes"]
            return p if q.resolution == 1 else 1 - p
        return self.probabilities.get(q.resolution, 0.0)

    @property
    def brier(self) -> float:
        q = self.question
        if q.answer_type == answers.BINARY:
            return (self.probabilities["yes"] - q.resolution) ** 2
        return sum((p - (label == q.resolution)) ** 2 for label, p in self._full().items())

    def _full(self) -> dict[str, float]:
        return {label: self.probabilities.get(label, 0.0) for label in self.question.options}

    def row(self) -> dict:
        q = self.question
        forecast = (
            round(self.probabilities["yes"], 4)
            if q.answer_type == answers.BINARY
            else {k: round(v, 4) for k, v in self._full().items()}
        )
        return {
            "id": q.id,
            "answer_type": q.answer_type,
            "forecast": forecast,
            "resolution": q.resolution,
            "probability_of_outcome": round(self.probability_of_outcome, 4),
            "brier": round(self.brier, 4),
        }


# ---- asking ------------------------------------------------------------------------------------


def question_text(question: ResolvedQuestion) -> str:
    """The question as it is asked: its text, then its options as `A) ...` lines."""
    if not question.options:
        return question.question
    lines = "\n".join(f"{label}) {text}" for label, text in question.options.items())
    return f"{question.question}\n{lines}"


def _probabilities(kind: str, parsed: dict | None, where: str) -> dict[str, float]:
    if parsed is None or parsed["answer_type"] != kind:
        raise ValueError(f"{where}: the reply carries no {kind} answer")
    if kind == answers.BINARY:
        return {"yes": parsed["probability"]}
    return dict(parsed["probabilities"])


class _LabAsker:
    def __init__(self, lab, reasoning_effort: str, seed: int):
        self.lab, self.reasoning_effort, self.seed = lab, reasoning_effort, seed

    def __call__(self, question: ResolvedQuestion) -> Forecasted:
        result = self.lab.forecast(
            question_text(question),
            answer_type=question.answer_type,
            reasoning_effort=self.reasoning_effort,
            seed=self.seed,
        )
        if question.answer_type == answers.BINARY:
            found = {"yes": result.binary.probability}
        else:
            found = result.multiple_choice.by_label()
        return Forecasted(question, found, result.usage.total_tokens)


class _HTTPAsker:
    """Asks a server of this API (its root URL, or its OpenAI base URL ending in /openai)."""

    def __init__(self, url: str, reasoning_effort: str, seed: int, model, api_key, timeout):
        import httpx

        root = url.rstrip("/").removesuffix("/openai")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=f"{root}/openai", headers=headers, timeout=timeout)
        self.reasoning_effort, self.seed = reasoning_effort, seed
        if model is None:
            models = self._json(self.http.get("/models"))["data"]
            model = models[0]["id"]
        self.model = model

    @staticmethod
    def _json(response) -> dict:
        if response.status_code != 200:
            raise RuntimeError(
                f"{response.request.url}: HTTP {response.status_code}: {response.text}"
            )
        return response.json()

    def __call__(self, question: ResolvedQuestion) -> Forecasted:
        reply = self._json(
            self.http.post(
                "/chat/completions",
                json={
                    "model": self.model,
                    "messages": [{"role": "user", "content": question_text(question)}],
                    "answer_type": question.answer_type,
                    "reasoning_effort": self.reasoning_effort,
                    "seed": self.seed,
                },
            )
        )
        content = reply["choices"][0]["message"]["content"]
        parsed = answers.parse_answer(content, question.answer_type)
        found = _probabilities(question.answer_type, parsed, f"question {question.id!r}")
        return Forecasted(question, found, reply.get("usage", {}).get("total_tokens", 0))

    def close(self) -> None:
        self.http.close()


def evaluate(
    target,
    questions: Iterable[ResolvedQuestion] | str | None = None,
    *,
    reasoning_effort: str = "low",
    seed: int = 0,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 600,
    concurrency: int = 4,
    progress: bool | None = None,
) -> Evaluation:
    """Forecasts every resolved question with `target` and scores the forecasts.

    target: a Lab, or the URL of a server of this API (`http://HOST:PORT`, or its base
    URL ending in /openai; `model` defaults to the first it lists). questions: resolved
    questions, a JSONL path, or None for the set that ships with foresight-lab.
    concurrency: questions in flight at once (the engine batches them).
    """
    if questions is None or isinstance(questions, str):
        questions = load_questions(questions)
    questions = list(questions)
    if not questions:
        raise ValueError("questions: nothing to evaluate")
    effort = answers.reasoning_effort(reasoning_effort)
    if isinstance(target, str):
        ask = _HTTPAsker(target, effort, seed, model, api_key, timeout)
    elif hasattr(target, "forecast"):
        ask = _LabAsker(target, effort, seed)
    else:
        raise TypeError(f"target: a Lab or a server URL, got {type(target).__name__}")
    try:
        forecasts = [
            ask(q)
            for q in progress_bar(questions, desc="Evaluating", unit="question", progress=progress)
        ]
    finally:
        if isinstance(ask, _HTTPAsker):
            ask.close()
    return Evaluation(forecasts)


# ---- the scores ----------------------------------------------------------------------------


class Evaluation:
    """Forecasts of resolved questions: `rows` (one per question), `summary` (scores),
    `reliability_diagram()`, `calibrate(...)`."""

    def __init__(self, forecasts: Sequence[Forecasted]):
        self.forecasts = list(forecasts)
        binary = [f for f in self.forecasts if f.question.answer_type == answers.BINARY]
        self.binary_probabilities = np.asarray([f.probabilities["yes"] for f in binary])
        self.binary_outcomes = np.asarray([f.question.resolution for f in binary], np.int64)
        self.multiple_choice = [
            f for f in self.forecasts if f.question.answer_type != answers.BINARY
        ]

    @property
    def rows(self) -> list[dict]:
        return [f.row() for f in self.forecasts]

    @property
    def summary(self) -> dict[str, float | int]:
        return summarize(self.binary_probabilities, self.binary_outcomes, self.multiple_choice)

    def reliability_diagram(self, ax=None, bins: int = ECE_BINS):
        """The binary forecasts' reliability diagram (matplotlib Axes)."""
        return metrics.reliability_diagram(
            self.binary_probabilities, self.binary_outcomes, bins=bins, ax=ax
        )

    def calibrate(
        self, method: str = "platt", split: float = 0.5, seed: int = 0
    ) -> CalibrationReport:
        """Fits a calibration map on a random `split` of the binary forecasts and scores
        the rest before and after it."""
        n = len(self.binary_probabilities)
        order = np.random.default_rng(seed).permutation(n)
        cut = int(round(n * split))
        if cut < 2 or n - cut < 2:
            raise ValueError(f"calibrate: {n} binary forecasts are too few to split {split}")
        fit, held = order[:cut], order[cut:]
        p, y = self.binary_probabilities, self.binary_outcomes
        calibrator = Calibrator.fit(p[fit], y[fit], method)
        return CalibrationReport(
            calibrator,
            before=summarize(p[held], y[held]),
            after=summarize(calibrator(p[held]), y[held]),
            fitted_on=len(fit),
        )

    def to_pandas(self):
        try:
            import pandas
        except ImportError as error:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from error
        return pandas.DataFrame(self.rows)

    def _repr_html_(self) -> str:
        summary = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{_shown(v)}</td></tr>"
            for k, v in self.summary.items()
        )
        header = "".join(f"<th>{k}</th>" for k in self.rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
            for row in self.rows
        )
        return (
            f"<table><caption>summary</caption>{summary}</table>"
            f"<details><summary>{len(self.rows)} forecasts</summary>"
            f"<table><tr>{header}</tr>{body}</table></details>"
        )

    def __repr__(self) -> str:
        scores = ", ".join(f"{k}={_shown(v)}" for k, v in self.summary.items())
        return f"Evaluation({scores})"


def _shown(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summarize(
    probabilities: np.ndarray, outcomes: np.ndarray, multiple_choice: Sequence[Forecasted] = ()
) -> dict[str, float | int]:
    """Scores of binary forecasts (and of multiple-choice ones, when given)."""
    summary: dict[str, float | int] = {"binary_questions": len(probabilities)}
    if len(probabilities):
        base_rate = float(np.mean(outcomes))
        summary.update(
            brier=metrics.brier_score(probabilities, outcomes),
            log_score=metrics.log_score(probabilities, outcomes),
            brier_skill_vs_base_rate=(
                metrics.brier_skill_score(probabilities, outcomes, base_rate)
                if 0 < base_rate < 1
                else math.nan
            ),
            expected_calibration_error=metrics.expected_calibration_error(
                probabilities, outcomes, bins=ECE_BINS
            ),
            base_rate=base_rate,
            mean_forecast=float(np.mean(probabilities)),
        )
    if multiple_choice:
        briers = [f.brier for f in multiple_choice]
        logs = [
            -math.log(max(f.probability_of_outcome, metrics.LOG_EPSILON)) for f in multiple_choice
        ]
        summary.update(
            multiple_choice_questions=len(multiple_choice),
            multiple_choice_brier=float(np.mean(briers)),
            multiple_choice_log_score=float(np.mean(logs)),
            multiple_choice_accuracy=float(
                np.mean(
                    [
                        max(f.probabilities, key=f.probabilities.get) == f.question.resolution
                        for f in multiple_choice
                    ]
                )
            ),
        )
    return summary


# ---- calibration ---------------------------------------------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


@dataclasses.dataclass(frozen=True)
class Calibrator:
    """A map of binary probabilities, `sigmoid(slope * logit(p) + intercept)`: Platt
    scaling fits both, temperature scaling only the slope (1 / temperature)."""

    method: str
    slope: float
    intercept: float = 0.0

    def __call__(self, probabilities):
        return _sigmoid(self.slope * _logit(probabilities) + self.intercept)

    @classmethod
    def fit(cls, probabilities, outcomes, method: str = "platt") -> Calibrator:
        """The map of this method that maximizes the likelihood of the outcomes."""
        x = _logit(probabilities)
        y = np.asarray(outcomes, np.float64)
        if method == "platt":
            return cls(method, *_logistic_regression(x, y))
        if method == "temperature":
            return cls(method, _positive_slope(x, y))
        raise ValueError(f"method: 'platt' or 'temperature', got {method!r}")


def _log_loss(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, z) - y * z))


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(z, np.float64)))  # no overflow


def _logistic_regression(x: np.ndarray, y: np.ndarray, ridge: float = 1e-6) -> tuple[float, float]:
    """(slope, intercept) of a one-feature logistic regression, by Newton's method with
    step halving (a tiny ridge keeps it finite when the forecasts separate the outcomes)."""
    features = np.stack([x, np.ones_like(x)], 1)

    def loss(w):
        return _log_loss(features @ w, y) + 0.5 * ridge * (w @ w) / len(y)

    weights = np.array([1.0, 0.0])  # from the identity map
    for _ in range(100):
        p = _sigmoid(features @ weights)
        gradient = features.T @ (p - y) + ridge * weights
        hessian = (features.T * (p * (1 - p))) @ features + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while loss(weights - scale * step) > loss(weights) and scale > 1e-6:
            scale /= 2
        weights = weights - scale * step
        if np.max(np.abs(scale * step)) < 1e-12:
            break
    return float(weights[0]), float(weights[1])


def _positive_slope(x: np.ndarray, y: np.ndarray) -> float:
    """1 / temperature: the positive slope of least log loss. The loss is convex in the
    slope, so a golden-section search over log(slope) in [-8, 5] finds it."""
    low, high = -8.0, 5.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if _log_loss(math.exp(a) * x, y) <= _log_loss(math.exp(b) * x, y):
            high = b
        else:
            low = a
    return math.exp((low + high) / 2)


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    calibrator: Calibrator
    before: dict  # scores on the held-out forecasts, as forecast
    after: dict  # the same forecasts, calibrated
    fitted_on: int

    def _repr_html_(self) -> str:
        keys = [k for k in self.before if k in self.after]
        rows = "".join(
            f"<tr><th>{k}</th><td>{_shown(self.before[k])}</td><td>{_shown(self.after[k])}</td></tr>"
            for k in keys
        )
        c = self.calibrator
        return (
            f"<p>{c.method} scaling: slope {c.slope:.3f}, intercept {c.intercept:.3f}, fitted "
            f"on {self.fitted_on} forecasts</p><table><tr><th></th><th>before</th>"
            f"<th>after</th></tr>{rows}</table>"
        )
