"""Evaluation runs (in process and over HTTP give the same forecasts) and calibration
(checked against scikit-learn)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import foresight_lab as fl
from foresight_lab.forecasting import metrics
from foresight_lab.forecasting.evaluate import Calibrator, Evaluation, Forecasted, question_text

matplotlib.use("Agg")

SHIPPED = fl.load_questions()
# A few binary and multiple-choice questions keep the tiny model's runs short.
SOME = [q for q in SHIPPED if q.answer_type == "binary"][:6] + [
    q for q in SHIPPED if q.answer_type == "multiple_choice"
][:2]


@pytest.fixture(scope="module")
def evaluation(tiny_lab) -> Evaluation:
    return fl.evaluate(tiny_lab, SOME, seed=3, progress=False)


def test_every_question_gets_a_forecast_and_a_row(evaluation):
    assert [r["id"] for r in evaluation.rows] == [q.id for q in SOME]
    binary = evaluation.rows[0]
    assert 0 < binary["forecast"] < 1 and binary["resolution"] in (0, 1)
    choice = evaluation.rows[-1]
    assert set(choice["forecast"]) == set(SOME[-1].options)
    assert math.isclose(sum(choice["forecast"].values()), 1, abs_tol=1e-3)


def test_the_summary_is_the_metrics_of_the_forecasts(evaluation):
    p, y = evaluation.binary_probabilities, evaluation.binary_outcomes
    summary = evaluation.summary
    assert summary["binary_questions"] == 6 and summary["multiple_choice_questions"] == 2
    assert summary["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert summary["log_score"] == pytest.approx(metrics.log_score(p, y))
    assert summary["brier_skill_vs_base_rate"] == pytest.approx(
        1 - np.mean((p - y) ** 2) / np.mean((y.mean() - y) ** 2)
    )
    per_question = [  # option counts differ: one question at a time
        metrics.multiclass_brier_score(
            [[f.probabilities[label] for label in f.question.options]],
            [list(f.question.options).index(f.question.resolution)],
            tolerance=1e-6,
        )
        for f in evaluation.multiple_choice
    ]
    assert summary["multiple_choice_brier"] == pytest.approx(np.mean(per_question))


def test_a_server_url_gives_the_same_forecasts_as_the_lab(tiny_lab, evaluation):
    with tiny_lab.serve(port=0) as server:
        remote = fl.evaluate(server.url, SOME, seed=3, progress=False)
        via_base_url = fl.evaluate(server.base_url, SOME[:1], seed=3, progress=False)
    for here, there in zip(evaluation.rows, remote.rows, strict=True):
        assert here["id"] == there["id"]
        if here["answer_type"] == "binary":
            assert there["forecast"] == pytest.approx(here["forecast"], abs=2e-4)
        else:
            for label in here["forecast"]:
                assert there["forecast"][label] == pytest.approx(here["forecast"][label], abs=2e-4)
    assert via_base_url.rows[0]["forecast"] == remote.rows[0]["forecast"]


def test_questions_are_asked_with_their_options_lettered():
    question = next(q for q in SHIPPED if q.answer_type == "multiple_choice")
    text = question_text(question)
    assert text.startswith(question.question)
    assert all(f"\n{label}) {option}" in text for label, option in question.options.items())


def test_the_reliability_diagram_draws(evaluation):
    ax = evaluation.reliability_diagram()
    assert ax.get_xlabel() and len(ax.lines) >= 1
    assert "<table>" in evaluation._repr_html_() and "brier" in repr(evaluation)


def test_a_bad_target_says_what_it_takes():
    with pytest.raises(TypeError, match="a Lab or a server URL"):
        fl.evaluate(42, SOME)


# ---- calibration --------------------------------------------------------------------


def _miscalibrated(n=400, seed=0):
    """Forecasts too sure of themselves and biased toward no."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.05, 0.95, n)
    outcomes = (rng.uniform(size=n) < truth).astype(int)
    logit = np.log(truth / (1 - truth))
    return 1 / (1 + np.exp(-(2.5 * logit - 1.0))), outcomes


def test_platt_scaling_is_the_logistic_regression_of_the_logits():
    p, y = _miscalibrated()
    calibrator = Calibrator.fit(p, y, "platt")
    logit = np.log(p / (1 - p))[:, None]
    reference = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(logit, y)
    assert calibrator.slope == pytest.approx(reference.coef_[0, 0], rel=1e-4)
    assert calibrator.intercept == pytest.approx(reference.intercept_[0], rel=1e-4, abs=1e-5)
    assert calibrator.slope == pytest.approx(1 / 2.5, abs=0.1)  # it undoes the over-confidence


def test_temperature_scaling_finds_the_best_positive_slope():
    p, y = _miscalibrated()
    calibrator = Calibrator.fit(p, y, "temperature")
    assert calibrator.intercept == 0 and calibrator.slope > 0
    logit = np.log(p / (1 - p))

    def loss(slope):
        return metrics.log_score(1 / (1 + np.exp(-slope * logit)), y)

    best = loss(calibrator.slope)
    assert best <= loss(calibrator.slope * 1.01) and best <= loss(calibrator.slope * 0.99)
    # Forecasts that are anti-informative get the flattest map, never a flipped one.
    flipped = Calibrator.fit(1 - p, y, "temperature")
    assert 0 < flipped.slope < 1e-3


def test_calibrating_an_evaluation_scores_held_out_forecasts_before_and_after():
    p, y = _miscalibrated(200, seed=1)
    questions = [
        fl.ResolvedQuestion(f"q{i}", "?", "binary", int(o), *[SHIPPED[0].open_date] * 2)
        for i, o in enumerate(y)
    ]
    evaluation = Evaluation(
        [Forecasted(q, {"yes": float(pi)}) for q, pi in zip(questions, p, strict=True)]
    )
    report = evaluation.calibrate("platt", split=0.5, seed=0)
    assert report.fitted_on == 100 and report.before["binary_questions"] == 100
    assert report.after["log_score"] < report.before["log_score"]
    assert report.after["expected_calibration_error"] < report.before["expected_calibration_error"]
    assert "before" in report._repr_html_()


def test_lab_forecast_applies_a_calibrator(tiny_lab):
    raw = tiny_lab.forecast("Will it rain?", seed=1)
    shift = Calibrator("platt", 1.0, 1.0)
    adjusted = tiny_lab.forecast("Will it rain?", seed=1, calibrator=shift)
    assert adjusted.binary.probability == pytest.approx(float(shift(raw.binary.probability)))
    assert adjusted.content == f"<answer>{round(adjusted.binary.probability, 4)}</answer>"
