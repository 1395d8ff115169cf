"""Scoring and calibration metrics: hand-computed values, independent references, properties.

References (test-only): scikit-learn for Brier, log loss and calibration curves,
properscoring and scipy quadrature for the Gaussian CRPS, scipy for binned statistics.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import properscoring
import pytest
import scipy.integrate
import scipy.stats
import sklearn.calibration
import sklearn.metrics
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from foresight_lab.forecasting import metrics

matplotlib.use("Agg")

TOLERANCE = 1e-9
SIZE = 998  # SIZE - 1 is prime: no quantile edge lands on a forecast, so no bin assignment ties


def random_binary(seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Forecasts strictly inside (0, 1) and outcomes drawn from them (so roughly calibrated)."""
    rng = np.random.default_rng(seed)
    probabilities = rng.uniform(0.01, 0.99, size)
    return probabilities, (rng.uniform(size=size) < probabilities).astype(int)


def random_multiclass(seed: int, classes: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(classes), size)
    return probabilities, rng.integers(0, classes, size)


probability = st.floats(0.0, 1.0)
outcome = st.integers(0, 1)
forecast_sets = st.lists(st.tuples(probability, outcome), min_size=1, max_size=50)


# --- Brier score ------------------------------------------------------------------


def test_brier_score_hand_computed():
    # (0.01 + 0.01 + 0.04 + 0.09) / 4
    assert metrics.brier_score([0.1, 0.9, 0.8, 0.3], [0, 1, 1, 0]) == pytest.approx(0.0375)


def test_brier_score_accepts_bool_outcomes_and_a_scalar_forecast():
    assert metrics.brier_score([0.1, 0.9], [False, True]) == pytest.approx(0.01)
    assert metrics.brier_score(0.7, 0) == pytest.approx(0.49)


@pytest.mark.parametrize("seed", range(3))
def test_brier_score_matches_sklearn(seed):
    probabilities, outcomes = random_binary(seed)
    expected = sklearn.metrics.brier_score_loss(outcomes, probabilities)
    assert metrics.brier_score(probabilities, outcomes) == pytest.approx(expected, abs=TOLERANCE)


@given(st.lists(outcome, min_size=1, max_size=50))
def test_brier_score_of_a_perfect_forecaster_is_zero(outcomes):
    assert metrics.brier_score(np.array(outcomes, float), outcomes) == 0.0


@given(st.lists(outcome, min_size=1, max_size=50))
def test_brier_score_of_always_one_half_is_one_quarter(outcomes):
    assert metrics.brier_score(np.full(len(outcomes), 0.5), outcomes) == pytest.approx(0.25)


# --- log score --------------------------------------------------------------------


def test_log_score_hand_computed_in_nats():
    expected = (-math.log(0.8) - math.log(0.6)) / 2
    assert metrics.log_score([0.8, 0.4], [1, 0]) == pytest.approx(expected)
    assert metrics.log_score([0.5, 0.5], [1, 0]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("seed", range(3))
def test_log_score_matches_sklearn(seed):
    probabilities, outcomes = random_binary(seed)
    expected = sklearn.metrics.log_loss(outcomes, probabilities, labels=[0, 1])
    assert metrics.log_score(probabilities, outcomes) == pytest.approx(expected, abs=TOLERANCE)


def test_log_score_charges_a_certain_mistake_minus_log_epsilon():
    assert metrics.log_score([0.0], [1]) == pytest.approx(-math.log(metrics.LOG_EPSILON))
    assert metrics.log_score([1.0, 0.5], [0, 1], epsilon=1e-3) == pytest.approx(
        (-math.log(1e-3) + math.log(2)) / 2
    )


def test_log_score_with_epsilon_zero_is_strict():
    assert metrics.log_score([1.0], [0], epsilon=0.0) == math.inf
    assert metrics.log_score([1.0, 0.0], [1, 0], epsilon=0.0) == 0.0


@given(forecast_sets)
def test_binary_log_score_equals_multiclass_on_two_columns(pairs):
    probabilities, outcomes = (np.array(column) for column in zip(*pairs, strict=True))
    rows = np.stack([1 - probabilities, probabilities], axis=1)
    binary = metrics.log_score(probabilities, outcomes)
    assert binary >= 0.0
    assert binary == pytest.approx(metrics.multiclass_log_score(rows, outcomes), abs=1e-12)


# --- Brier skill score ------------------------------------------------------------


def test_brier_skill_score_against_the_base_rate_hand_computed():
    # base rate 0.5, reference Brier 0.25; Brier (0.01 + 0.04 + 0.16 + 0.01) / 4 = 0.055
    score = metrics.brier_skill_score([0.9, 0.2, 0.6, 0.1], [1, 0, 1, 0])
    assert score == pytest.approx(1 - 0.055 / 0.25)


def test_brier_skill_score_against_a_constant_and_a_forecaster():
    # constant 0.3: reference Brier (0.49 + 0.09) / 2 = 0.29; forecast Brier (0.04 + 0.01) / 2
    assert metrics.brier_skill_score([0.8, 0.1], [1, 0], 0.3) == pytest.approx(1 - 0.025 / 0.29)
    assert metrics.brier_skill_score([0.8, 0.1], [1, 0], [0.6, 0.4]) == pytest.approx(
        1 - 0.025 / 0.16
    )


@pytest.mark.parametrize("seed", range(3))
def test_brier_skill_score_matches_sklearn_ratio(seed):
    probabilities, outcomes = random_binary(seed)
    reference, _ = random_binary(seed + 100)
    for given_reference, reference_forecast in [
        (None, np.full(SIZE, outcomes.mean())),
        (0.4, np.full(SIZE, 0.4)),
        (reference, reference),
    ]:
        expected = 1 - sklearn.metrics.brier_score_loss(
            outcomes, probabilities
        ) / sklearn.metrics.brier_score_loss(outcomes, reference_forecast)
        score = metrics.brier_skill_score(probabilities, outcomes, given_reference)
        assert score == pytest.approx(expected, abs=TOLERANCE)


@given(forecast_sets)
def test_brier_skill_score_of_the_reference_itself_is_zero(pairs):
    probabilities, outcomes = (np.array(column) for column in zip(*pairs, strict=True))
    assume(np.mean((probabilities - outcomes) ** 2) > 0)  # else skill is undefined (tested below)
    assert metrics.brier_skill_score(probabilities, outcomes, probabilities) == 0.0


@given(forecast_sets)
def test_brier_skill_score_of_a_perfect_forecaster_is_one(pairs):
    reference, outcomes = (np.array(column) for column in zip(*pairs, strict=True))
    assume(np.mean((reference - outcomes) ** 2) > 0)
    perfect = outcomes.astype(float)
    assert metrics.brier_skill_score(perfect, outcomes, reference) == 1.0


# --- calibration curve and expected calibration error -----------------------------

HAND_PROBABILITIES = [0.05, 0.15, 0.12, 0.95]
HAND_OUTCOMES = [0, 1, 0, 1]


def test_calibration_curve_hand_computed_keeps_empty_bins_as_nan():
    curve = metrics.calibration_curve(HAND_PROBABILITIES, HAND_OUTCOMES, bins=4)
    np.testing.assert_array_equal(curve.counts, [3, 0, 0, 1])
    np.testing.assert_allclose(curve.mean_forecast, [0.32 / 3, np.nan, np.nan, 0.95])
    np.testing.assert_allclose(curve.observed_frequency, [1 / 3, np.nan, np.nan, 1.0])
    np.testing.assert_allclose(curve.edges, [0, 0.25, 0.5, 0.75, 1])


def test_calibration_bins_are_right_closed_and_hold_both_ends():
    curve = metrics.calibration_curve([0.0, 0.3, 0.30001, 0.7, 1.0], [0, 0, 0, 0, 0], bins=10)
    # 0.0 -> first bin, 0.3 -> (0.2, 0.3], 0.30001 -> (0.3, 0.4], 0.7 -> (0.6, 0.7], 1 -> last
    np.testing.assert_array_equal(np.flatnonzero(curve.counts), [0, 2, 3, 6, 9])


def test_quantile_bins_hold_equal_counts():
    probabilities, outcomes = random_binary(0, size=1000)
    curve = metrics.calibration_curve(probabilities, outcomes, bins=10, strategy="quantile")
    np.testing.assert_array_equal(curve.counts, np.full(10, 100))


def test_quantile_bins_with_ties_leave_empty_bins():
    curve = metrics.calibration_curve([0.2] * 5 + [0.9], [0, 0, 1, 0, 0, 1], 4, "quantile")
    assert curve.counts.sum() == 6
    assert np.isnan(curve.mean_forecast[curve.counts == 0]).all()


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("bins", [1, 5, 10, 15])
def test_calibration_curve_matches_sklearn(strategy, bins):
    probabilities, outcomes = random_binary(bins)
    curve = metrics.calibration_curve(probabilities, outcomes, bins, strategy)
    observed, predicted = sklearn.calibration.calibration_curve(
        outcomes, probabilities, n_bins=bins, strategy=strategy
    )
    filled = curve.counts > 0
    np.testing.assert_allclose(curve.mean_forecast[filled], predicted, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(curve.observed_frequency[filled], observed, rtol=0, atol=TOLERANCE)


def test_expected_calibration_error_hand_computed():
    # 3/4 * |0.32/3 - 1/3| + 1/4 * |0.95 - 1|
    expected = 0.75 * abs(0.32 / 3 - 1 / 3) + 0.25 * 0.05
    ece = metrics.expected_calibration_error(HAND_PROBABILITIES, HAND_OUTCOMES, bins=4)
    assert ece == pytest.approx(expected)


@pytest.mark.parametrize("bins", [1, 10, 20])
def test_expected_calibration_error_matches_scipy_binned_statistics(bins):
    probabilities, outcomes = random_binary(bins)
    edges = np.linspace(0, 1, bins + 1)
    means = scipy.stats.binned_statistic(probabilities, probabilities, "mean", edges).statistic
    rates = scipy.stats.binned_statistic(probabilities, outcomes, "mean", edges).statistic
    counts = scipy.stats.binned_statistic(probabilities, outcomes, "count", edges).statistic
    filled = counts > 0
    expected = np.sum(counts[filled] * np.abs(means[filled] - rates[filled])) / SIZE
    ece = metrics.expected_calibration_error(probabilities, outcomes, bins)
    assert ece == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("bins", [3, 10])
def test_quantile_expected_calibration_error_matches_sklearn_curve(bins):
    probabilities, outcomes = random_binary(bins)
    observed, predicted = sklearn.calibration.calibration_curve(
        outcomes, probabilities, n_bins=bins, strategy="quantile"
    )
    # Counts by brute force: with no ties every quantile bin holds the forecasts between
    # consecutive order statistics, so sorting recovers them.
    ordered = np.sort(probabilities)
    counts = np.array([np.sum(np.isin(probabilities, chunk)) for chunk in _chunks(ordered, bins)])
    expected = np.sum(counts * np.abs(predicted - observed)) / SIZE
    ece = metrics.expected_calibration_error(probabilities, outcomes, bins, "quantile")
    assert ece == pytest.approx(expected, abs=TOLERANCE)


def _chunks(ordered: np.ndarray, bins: int) -> list[np.ndarray]:
    positions = np.linspace(0, 1, bins + 1) * (len(ordered) - 1)
    # A quantile edge at fractional position q closes the bin holding ranks <= floor(q).
    stops = [int(math.floor(q)) + 1 for q in positions[1:-1]] + [len(ordered)]
    starts = [0, *stops[:-1]]
    return [ordered[a:b] for a, b in zip(starts, stops, strict=True)]


calibrated_groups = st.lists(
    st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60)
@given(calibrated_groups, st.integers(1, 12), st.sampled_from(["uniform", "quantile"]))
def test_expected_calibration_error_of_perfectly_calibrated_groups_is_zero(groups, bins, strategy):
    # Each group forecasts m/n on n questions, m of which happen: calibrated in any binning.
    probabilities = np.concatenate([np.full(n, m / n) for n, m in groups])
    outcomes = np.concatenate([np.arange(n) < m for n, m in groups])
    ece = metrics.expected_calibration_error(probabilities, outcomes, bins, strategy)
    assert ece == pytest.approx(0.0, abs=1e-12)


@given(probability, st.lists(outcome, min_size=1, max_size=50))
def test_expected_calibration_error_of_a_constant_forecast_is_its_gap(constant, outcomes):
    ece = metrics.expected_calibration_error(np.full(len(outcomes), constant), outcomes)
    assert ece == pytest.approx(abs(constant - np.mean(outcomes)), abs=1e-12)


# --- reliability diagram ----------------------------------------------------------


def test_reliability_diagram_draws_one_bar_and_label_per_filled_bin():
    import matplotlib.pyplot as plt

    ax = metrics.reliability_diagram(HAND_PROBABILITIES, HAND_OUTCOMES, bins=4)
    try:
        assert len(ax.patches) == 2  # bins 0 and 3 are filled
        assert sorted(text.get_text() for text in ax.texts) == ["n=1", "n=3"]
        diagonal, points = ax.lines
        np.testing.assert_array_equal(diagonal.get_xydata(), [[0, 0], [1, 1]])
        np.testing.assert_allclose(points.get_xydata(), [[0.32 / 3, 1 / 3], [0.95, 1.0]])
        ax.figure.canvas.draw()  # renders under Agg
    finally:
        plt.close(ax.figure)


def test_reliability_diagram_draws_on_a_given_axes():
    from matplotlib.figure import Figure

    probabilities, outcomes = random_binary(0)
    given_axes = Figure().add_subplot()
    ax = metrics.reliability_diagram(probabilities, outcomes, bins=10, ax=given_axes)
    assert ax is given_axes
    assert len(ax.patches) == 10 and len(ax.texts) == 10


# --- multi-class scores -----------------------------------------------------------

HAND_ROWS = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]


def test_multiclass_brier_score_hand_computed_sums_over_classes():
    # (0.09 + 0.04 + 0.01 + 0.01 + 0.09 + 0.16) / 2
    assert metrics.multiclass_brier_score(HAND_ROWS, [0, 2]) == pytest.approx(0.2)


def test_multiclass_log_score_hand_computed():
    expected = (-math.log(0.7) - math.log(0.6)) / 2
    assert metrics.multiclass_log_score(HAND_ROWS, [0, 2]) == pytest.approx(expected)
    assert metrics.multiclass_log_score(np.full((3, 4), 0.25), [0, 1, 3]) == pytest.approx(
        math.log(4)
    )


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_multiclass_scores_match_sklearn(classes):
    probabilities, outcomes = random_multiclass(classes, classes)
    labels = list(range(classes))
    brier = sklearn.metrics.brier_score_loss(
        outcomes, probabilities, labels=labels, scale_by_half=False
    )
    log = sklearn.metrics.log_loss(outcomes, probabilities, labels=labels)
    assert metrics.multiclass_brier_score(probabilities, outcomes) == pytest.approx(
        brier, abs=TOLERANCE
    )
    assert metrics.multiclass_log_score(probabilities, outcomes) == pytest.approx(
        log, abs=TOLERANCE
    )


@given(forecast_sets)
def test_two_class_brier_is_twice_the_binary_brier(pairs):
    probabilities, outcomes = (np.array(column) for column in zip(*pairs, strict=True))
    rows = np.stack([1 - probabilities, probabilities], axis=1)
    assert metrics.multiclass_brier_score(rows, outcomes) == pytest.approx(
        2 * metrics.brier_score(probabilities, outcomes), abs=1e-12
    )


# --- CRPS of Gaussian forecasts ---------------------------------------------------


def test_crps_gaussian_hand_computed_at_the_mean():
    # z = 0: 2 phi(0) - 1/sqrt(pi) = (sqrt 2 - 1) / sqrt(pi), times sd
    expected = 2.0 * (math.sqrt(2) - 1) / math.sqrt(math.pi)
    assert metrics.crps_gaussian(5.0, 2.0, 5.0) == pytest.approx(expected)


def test_crps_gaussian_matches_properscoring():
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 10, SIZE)
    spread = rng.uniform(0.1, 5, SIZE)
    observed = rng.normal(0, 10, SIZE)
    expected = properscoring.crps_gaussian(observed, mean, spread).mean()
    assert metrics.crps_gaussian(mean, spread, observed) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize(("mean", "spread", "observed"), [(0, 1, 0.3), (41, 3.5, 47), (-2, 0.2, 9)])
def test_crps_gaussian_matches_the_integral_definition(mean, spread, observed):
    # CRPS = integral of (F(t) - 1[t >= x])^2 dt, split at the observation.
    cdf = scipy.stats.norm(mean, spread).cdf
    below, _ = scipy.integrate.quad(lambda t: cdf(t) ** 2, -np.inf, observed, epsabs=1e-13)
    above, _ = scipy.integrate.quad(lambda t: (1 - cdf(t)) ** 2, observed, np.inf, epsabs=1e-13)
    score = metrics.crps_gaussian(mean, spread, observed)
    assert score == pytest.approx(below + above, abs=TOLERANCE)


def test_crps_gaussian_broadcasts_a_scalar_spread_and_tends_to_absolute_error():
    observed = np.array([1.0, -2.0, 4.0])
    per_question = metrics.crps_gaussian(np.zeros(3), np.full(3, 1.5), observed)
    assert metrics.crps_gaussian(np.zeros(3), 1.5, observed) == per_question
    assert metrics.crps_gaussian(0.0, 1e-9, observed) == pytest.approx(np.abs(observed).mean())


# --- bad input --------------------------------------------------------------------

BAD_INPUTS = {
    "shape mismatch": (lambda: metrics.brier_score([0.1, 0.2], [1]), "one outcome per forecast"),
    "probability above 1": (lambda: metrics.log_score([1.2], [1]), r"\[0, 1\]"),
    "negative probability": (lambda: metrics.brier_score([-0.1], [1]), r"\[0, 1\]"),
    "percentages": (lambda: metrics.brier_score([70], [1]), "not percentages"),
    "NaN probability": (lambda: metrics.brier_score([np.nan], [1]), "NaN"),
    "outcome not 0/1": (lambda: metrics.brier_score([0.5], [2]), "0 or 1"),
    "empty probabilities": (lambda: metrics.brier_score([], []), "empty"),
    "empty outcomes": (lambda: metrics.brier_score(0.5, []), "empty"),
    "bad epsilon": (lambda: metrics.log_score([0.5], [1], epsilon=0.7), "epsilon"),
    "reference shape": (
        lambda: metrics.brier_skill_score([0.5, 0.5], [0, 1], [0.5]),
        "reference has shape",
    ),
    "reference outside": (lambda: metrics.brier_skill_score([0.5], [1], 1.5), "reference"),
    "perfect base rate": (lambda: metrics.brier_skill_score([0.5, 0.5], [1, 1]), "undefined"),
    "zero bins": (lambda: metrics.calibration_curve([0.5], [1], bins=0), "bins"),
    "float bins": (lambda: metrics.expected_calibration_error([0.5], [1], bins=2.5), "bins"),
    "unknown strategy": (
        lambda: metrics.reliability_diagram([0.5], [1], strategy="equal"),
        "strategy",
    ),
    "rows not summing to 1": (
        lambda: metrics.multiclass_brier_score([[0.5, 0.4]], [0]),
        "sum to 1",
    ),
    "multiclass 1-D": (lambda: metrics.multiclass_log_score([0.5, 0.5], [0]), "2-D"),
    "one class column": (lambda: metrics.multiclass_log_score([[1.0]], [0]), "at least 2"),
    "multiclass empty": (lambda: metrics.multiclass_brier_score(np.zeros((0, 3)), []), "empty"),
    "multiclass rows mismatch": (
        lambda: metrics.multiclass_brier_score(HAND_ROWS, [0]),
        "one class index per row",
    ),
    "class out of range": (lambda: metrics.multiclass_brier_score(HAND_ROWS, [0, 3]), r"\[0, 3\)"),
    "float class index": (
        lambda: metrics.multiclass_log_score(HAND_ROWS, [0.0, 1.0]),
        "integer class indices",
    ),
    "zero spread": (lambda: metrics.crps_gaussian([0.0], [0.0], [1.0]), "positive"),
    "negative spread": (lambda: metrics.crps_gaussian(0.0, -1.0, [1.0]), "positive"),
    "crps shape mismatch": (
        lambda: metrics.crps_gaussian([0.0, 1.0], 1.0, [1.0, 2.0, 3.0]),
        "mean has shape",
    ),
    "crps empty": (lambda: metrics.crps_gaussian(0.0, 1.0, []), "empty"),
    "crps NaN": (lambda: metrics.crps_gaussian(np.nan, 1.0, [1.0]), "finite"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error_saying_what_to_fix(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()
