"""Scores and calibration for probabilistic forecasts: pure numpy, no model needed.

Conventions shared by every function here:

- A binary forecast is the probability of the event; its outcome is 1 (happened) or 0
  (did not), as ints, bools or floats. Shapes are `[N]`, one element per question;
  any matching shapes work (every element is one forecast) and a scalar is one forecast.
- A multi-class forecast is a row of `K` probabilities summing to 1, `[N, K]`; its
  outcome is the index of the class that happened, `[N]`.
- Scores are averaged over forecasts and returned as a Python float. Brier, log score,
  CRPS and calibration error are losses (lower is better, 0 is perfect); the skill
  score is a gain (higher is better, 1 is perfect, 0 is no better than the reference).
- Logarithms are natural (nats).
- Bad input raises ValueError with a message that says what to fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LOG_EPSILON = 1e-15
"""Default floor on the probability a log score charges for: a forecast of exactly 0
(or 1) that turns out wrong costs -ln(1e-15), about 34.5 nats, instead of infinity."""

ROW_SUM_TOLERANCE = 1e-6
"""How far a multi-class row may sum from 1 (absolute) before it is rejected."""

Strategy = Literal["uniform", "quantile"]


# --- validation -------------------------------------------------------------------


def _probabilities(values: ArrayLike, name: str = "probabilities") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} is empty: pass at least one forecast.")
    inside = (array >= 0.0) & (array <= 1.0)  # False for NaN too
    if not inside.all():
        bad = array[~inside].flat[0]
        raise ValueError(
            f"{name} must lie in [0, 1]; found {bad!r}. "
            "Pass probabilities, not percentages, logits or NaN."
        )
    return array


def _binary_outcomes(values: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError("outcomes is empty: pass one 0/1 outcome per forecast.")
    if array.shape != shape:
        raise ValueError(
            f"outcomes has shape {array.shape} but probabilities has shape {shape}: "
            "pass one outcome per forecast."
        )
    as_float = array.astype(np.float64)
    binary = (as_float == 0.0) | (as_float == 1.0)
    if not binary.all():
        bad = array[~binary].flat[0]
        raise ValueError(
            f"outcomes must be 0 or 1 (or False/True); found {bad!r}. "
            "For several classes use multiclass_brier_score or multiclass_log_score."
        )
    return as_float


def _binary_pair(probabilities: ArrayLike, outcomes: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated (probabilities, outcomes) as float arrays of one shape."""
    forecast = _probabilities(probabilities)
    return forecast, _binary_outcomes(outcomes, forecast.shape)


def _multiclass_pair(
    probabilities: ArrayLike, outcomes: ArrayLike, tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Validated probabilities [N, K] (rows sum to 1) and class indices [N]."""
    forecast = np.asarray(probabilities, dtype=np.float64)
    if forecast.ndim != 2:
        raise ValueError(
            f"probabilities must be 2-D, [N questions, K classes]; got shape {forecast.shape}. "
            "For a single question pass a list holding one row."
        )
    forecast = _probabilities(forecast)
    if forecast.shape[1] < 2:
        raise ValueError(
            f"probabilities has {forecast.shape[1]} class column(s); a forecast needs at least 2."
        )
    row_sums = forecast.sum(axis=1)
    off = np.abs(row_sums - 1.0) > tolerance
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"each row of probabilities must sum to 1 (within {tolerance}); row {row} sums to "
            f"{row_sums[row]!r}. Normalize the rows, e.g. p / p.sum(axis=1, keepdims=True)."
        )
    classes = np.asarray(outcomes)
    if classes.shape != forecast.shape[:1]:
        raise ValueError(
            f"outcomes has shape {classes.shape} but probabilities has {forecast.shape[0]} rows: "
            "pass one class index per row, shape [N]."
        )
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            f"outcomes must be integer class indices (column numbers), got dtype {classes.dtype}."
        )
    count = forecast.shape[1]
    outside = (classes < 0) | (classes >= count)
    if outside.any():
        raise ValueError(
            f"outcomes must be class indices in [0, {count}); found {classes[outside][0]!r}."
        )
    return forecast, classes.astype(np.intp)


def _log_epsilon(epsilon: float) -> float:
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must lie in [0, 0.5); got {epsilon!r}.")
    return epsilon


def _negative_log(probability_of_outcome: np.ndarray, epsilon: float) -> np.ndarray:
    """-ln p of what happened, with p floored at epsilon (epsilon 0 allows infinity)."""
    with np.errstate(divide="ignore"):
        return -np.log(np.maximum(probability_of_outcome, epsilon))


# --- binary scores ----------------------------------------------------------------


def brier_score(probabilities: ArrayLike, outcomes: ArrayLike) -> float:
    """Brier score of binary forecasts: the mean squared error of the event's probability.

    `mean((p - y) ** 2)`, in [0, 1]; lower is better. Always forecasting 0.5 scores 0.25.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.

    Returns:
        The mean Brier score.

    Raises:
        ValueError: on empty input, mismatched shapes, probabilities outside [0, 1] or
            outcomes other than 0/1.
    """
    forecast, happened = _binary_pair(probabilities, outcomes)
    return float(np.mean((forecast - happened) ** 2))


def log_score(
    probabilities: ArrayLike, outcomes: ArrayLike, *, epsilon: float = LOG_EPSILON
) -> float:
    """Log score of binary forecasts as a loss: mean negative log-likelihood in nats.

    `mean(-ln q)` where q is the probability the forecast gave to what actually happened
    (p if the event happened, 1 - p if not). Lower is better; 0 is perfect; always
    forecasting 0.5 scores ln 2 ~ 0.693. Divide by ln 2 for bits.

    A forecast of exactly 0 or 1 that turns out wrong would cost infinity; q is floored
    at `epsilon` so one such mistake costs -ln(epsilon) (~34.5 nats by default) and the
    mean stays finite. Pass `epsilon=0` for the strict score, which may be `inf`.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.
        epsilon: the smallest probability charged for, in [0, 0.5).

    Returns:
        The mean negative log-likelihood, in nats.

    Raises:
        ValueError: on empty input, mismatched shapes, probabilities outside [0, 1],
            outcomes other than 0/1, or epsilon outside [0, 0.5).
    """
    forecast, happened = _binary_pair(probabilities, outcomes)
    probability_of_outcome = np.where(happened == 1.0, forecast, 1.0 - forecast)
    return float(np.mean(_negative_log(probability_of_outcome, _log_epsilon(epsilon))))


def brier_skill_score(
    probabilities: ArrayLike,
    outcomes: ArrayLike,
    reference: float | ArrayLike | None = None,
) -> float:
    """Brier skill score: the fraction of a reference forecast's Brier score removed.

    `1 - brier(forecast) / brier(reference)`; higher is better. 1 is perfect, 0 is no
    better than the reference, negative is worse than it.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.
        reference: what to beat. None (default): the base rate, a constant forecast of
            the outcomes' own mean (in-sample climatology, whose Brier score is
            rate * (1 - rate)). A float: that constant probability for every question.
            An array Float['N']: a reference forecaster's probabilities.

    Returns:
        The skill score.

    Raises:
        ValueError: on invalid forecasts, outcomes or reference, or when the reference
            is perfect (Brier score 0, e.g. the base rate when every outcome is equal),
            which leaves the skill undefined.
    """
    forecast, happened = _binary_pair(probabilities, outcomes)
    if reference is None:
        baseline = np.full_like(forecast, happened.mean())
        described = "the base rate (every outcome is equal)"
    else:
        baseline = _probabilities(reference, "reference")
        if baseline.ndim == 0:
            baseline = np.full_like(forecast, float(baseline))
        elif baseline.shape != forecast.shape:
            raise ValueError(
                f"reference has shape {baseline.shape} but probabilities has shape "
                f"{forecast.shape}: pass a constant or one reference probability per forecast."
            )
        described = "the reference"
    reference_brier = float(np.mean((baseline - happened) ** 2))
    if reference_brier == 0.0:
        raise ValueError(
            f"{described} has a Brier score of 0, so skill against it is undefined; "
            "choose another reference or more varied questions."
        )
    return 1.0 - float(np.mean((forecast - happened) ** 2)) / reference_brier


# --- calibration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationCurve:
    """Per-bin summary of binary forecasts; each array has one entry per bin, [B].

    Bin b holds the forecasts p with edges[b] < p <= edges[b + 1] (the first bin also
    holds p == edges[0]). An empty bin has count 0 and NaN means.
    """

    mean_forecast: np.ndarray  # Float['B'], mean probability forecast in the bin
    observed_frequency: np.ndarray  # Float['B'], fraction of the bin's events that happened
    counts: np.ndarray  # Int['B'], forecasts in the bin
    edges: np.ndarray  # Float['B+1'], increasing bin edges


def _bin_edges(forecast: np.ndarray, bins: int, strategy: str) -> np.ndarray:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}.")
    if strategy == "uniform":
        # k / bins is the correctly rounded decimal, so a forecast written as 0.3 lands
        # exactly on the edge 3/10 and belongs to the bin that edge closes.
        return np.arange(bins + 1) / bins
    if strategy == "quantile":
        return np.quantile(forecast, np.arange(bins + 1) / bins)
    raise ValueError(f'strategy must be "uniform" or "quantile"; got {strategy!r}.')


def calibration_curve(
    probabilities: ArrayLike,
    outcomes: ArrayLike,
    bins: int = 10,
    strategy: Strategy = "uniform",
) -> CalibrationCurve:
    """Group binary forecasts into bins and compare each bin's mean forecast with reality.

    A calibrated forecaster's events happen about as often as it said: in every bin,
    observed_frequency ~ mean_forecast. Bins are right-closed, (lo, hi], the usual
    convention in the calibration literature; the first bin also takes its lower edge.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.
        bins: the number of bins, B.
        strategy: "uniform" splits [0, 1] into B equal widths; "quantile" puts the edges
            at the forecasts' quantiles so bins hold about equally many forecasts (ties
            can leave some bins empty).

    Returns:
        A CalibrationCurve with per-bin mean forecast, observed frequency, counts and edges.

    Raises:
        ValueError: on invalid forecasts or outcomes, non-positive bins or an unknown
            strategy.
    """
    forecast, happened = _binary_pair(probabilities, outcomes)
    forecast, happened = forecast.ravel(), happened.ravel()
    edges = _bin_edges(forecast, bins, strategy)
    # side="left" on the inner edges: p equal to an edge goes to the bin it closes.
    index = np.searchsorted(edges[1:-1], forecast, side="left")
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_forecast = np.bincount(index, weights=forecast, minlength=bins) / counts
        observed = np.bincount(index, weights=happened, minlength=bins) / counts
    return CalibrationCurve(mean_forecast, observed, counts, edges)


def expected_calibration_error(
    probabilities: ArrayLike,
    outcomes: ArrayLike,
    bins: int = 10,
    strategy: Strategy = "uniform",
) -> float:
    """Expected calibration error: the count-weighted mean gap between forecast and reality.

    `sum_b (n_b / N) * |mean_forecast_b - observed_frequency_b|` over the bins of
    `calibration_curve`; in [0, 1], lower is better, 0 when every bin's events happen
    exactly as often as forecast. This is the calibration of the event's probability, as
    forecasting uses it, not of the top-class confidence max(p, 1 - p) used for classifiers.
    The value depends on the binning; compare models with the same bins and strategy.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.
        bins: the number of bins, B.
        strategy: "uniform" (equal widths) or "quantile" (about equal counts).

    Returns:
        The expected calibration error.

    Raises:
        ValueError: as calibration_curve.
    """
    curve = calibration_curve(probabilities, outcomes, bins, strategy)
    filled = curve.counts > 0
    gaps = np.abs(curve.mean_forecast[filled] - curve.observed_frequency[filled])
    return float(np.sum(curve.counts[filled] * gaps) / curve.counts.sum())


def reliability_diagram(
    probabilities: ArrayLike,
    outcomes: ArrayLike,
    bins: int = 10,
    ax: Axes | None = None,
    strategy: Strategy = "uniform",
) -> Axes:
    """Draw a reliability diagram of binary forecasts with matplotlib and return its Axes.

    One bar per non-empty bin spans the bin and rises to its observed frequency; a point
    per bin sits at (mean forecast, observed frequency), labelled with the bin's count;
    the dashed diagonal is perfect calibration. Points below the diagonal mean
    overconfidence in the event, points above mean underconfidence. Nothing is shown or
    saved, so it works under any backend (Agg included); in a notebook the figure
    displays inline.

    Args:
        probabilities: Float['N'], the forecast probability that each event happens.
        outcomes: Int['N'] or Bool['N'], 1 (or True) where the event happened.
        bins: the number of bins, B.
        ax: the Axes to draw on; None makes a new figure.
        strategy: "uniform" (equal widths) or "quantile" (about equal counts).

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: as calibration_curve.
    """
    curve = calibration_curve(probabilities, outcomes, bins, strategy)
    if ax is None:
        import matplotlib.pyplot as plt  # lazy: metrics must not need matplotlib

        _, ax = plt.subplots(figsize=(5, 5))
    filled = curve.counts > 0
    lower, upper = curve.edges[:-1][filled], curve.edges[1:][filled]
    ax.bar(
        lower,
        curve.observed_frequency[filled],
        width=upper - lower,
        align="edge",
        alpha=0.3,
        edgecolor="tab:blue",
        label="observed frequency per bin",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.plot(
        curve.mean_forecast[filled],
        curve.observed_frequency[filled],
        marker="o",
        color="tab:blue",
        label="mean forecast vs observed",
    )
    for x, y, count in zip(
        curve.mean_forecast[filled],
        curve.observed_frequency[filled],
        curve.counts[filled],
        strict=True,
    ):
        ax.annotate(f"n={count}", (x, y), xytext=(0, 6), textcoords="offset points", ha="center")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.05),
        xlabel="forecast probability",
        ylabel="observed frequency",
        title="Reliability diagram",
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize="small")
    return ax


# --- multi-class scores -----------------------------------------------------------


def multiclass_brier_score(
    probabilities: ArrayLike, outcomes: ArrayLike, *, tolerance: float = ROW_SUM_TOLERANCE
) -> float:
    """Brier score of multi-class forecasts, summed over classes (Brier's 1950 form).

    `mean_i sum_k (p_ik - [y_i == k]) ** 2`, in [0, 2]; lower is better. Note the sum
    over classes: for K = 2 this is twice `brier_score` of the second column.

    Args:
        probabilities: Float['N K'], each row a distribution over K classes.
        outcomes: Int['N'], the index of the class that happened.
        tolerance: how far a row may sum from 1.

    Returns:
        The mean multi-class Brier score.

    Raises:
        ValueError: on empty input, a non-2-D forecast, mismatched shapes, probabilities
            outside [0, 1], rows not summing to 1, or class indices out of range.
    """
    forecast, classes = _multiclass_pair(probabilities, outcomes, tolerance)
    one_hot = np.zeros_like(forecast)
    one_hot[np.arange(len(classes)), classes] = 1.0
    return float(np.mean(np.sum((forecast - one_hot) ** 2, axis=1)))


def multiclass_log_score(
    probabilities: ArrayLike,
    outcomes: ArrayLike,
    *,
    epsilon: float = LOG_EPSILON,
    tolerance: float = ROW_SUM_TOLERANCE,
) -> float:
    """Log score of multi-class forecasts as a loss: mean negative log-likelihood in nats.

    `mean_i -ln p_i[y_i]`, the probability given to the class that happened, floored
    at `epsilon` as in `log_score` (pass `epsilon=0` for the strict score). Lower is
    better; a uniform forecast over K classes scores ln K.

    Args:
        probabilities: Float['N K'], each row a distribution over K classes.
        outcomes: Int['N'], the index of the class that happened.
        epsilon: the smallest probability charged for, in [0, 0.5).
        tolerance: how far a row may sum from 1.

    Returns:
        The mean negative log-likelihood, in nats.

    Raises:
        ValueError: as multiclass_brier_score, or epsilon outside [0, 0.5).
    """
    forecast, classes = _multiclass_pair(probabilities, outcomes, tolerance)
    probability_of_outcome = forecast[np.arange(len(classes)), classes]
    return float(np.mean(_negative_log(probability_of_outcome, _log_epsilon(epsilon))))


# --- continuous scores ------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])  # numpy has no erf; scipy is test-only


def crps_gaussian(mean: ArrayLike, standard_deviation: ArrayLike, observations: ArrayLike) -> float:
    """Continuous ranked probability score of Gaussian forecasts, in closed form.

    For a forecast N(mean, sd^2) and observation x, with z = (x - mean) / sd:
    `sd * (z * (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`, Phi and phi the standard
    normal CDF and density. In the observations' units; lower is better; a point
    forecast's CRPS tends to its absolute error as sd -> 0.

    Args:
        mean: Float['N'], or a scalar for every observation, each forecast's mean.
        standard_deviation: Float['N'], or a scalar, each forecast's spread (> 0).
        observations: Float['N'], what happened.

    Returns:
        The mean CRPS over forecasts.

    Raises:
        ValueError: on empty input, shapes other than the observations' (or scalars),
            non-finite values, or a standard deviation that is not positive.
    """
    observed = np.asarray(observations, dtype=np.float64)
    if observed.size == 0:
        raise ValueError("observations is empty: pass at least one observation.")
    arrays = {"observations": observed}
    for name, values in (("mean", mean), ("standard_deviation", standard_deviation)):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 0 and array.shape != observed.shape:
            raise ValueError(
                f"{name} has shape {array.shape} but observations has shape {observed.shape}: "
                "pass a scalar or one value per observation."
            )
        arrays[name] = array
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite; found NaN or infinity.")
    spread = arrays["standard_deviation"]
    if not (spread > 0).all():
        raise ValueError(
            f"standard_deviation must be positive; found {spread[spread <= 0].flat[0]!r}. "
            "A point forecast has no spread: use its absolute error instead."
        )
    z = (observed - arrays["mean"]) / spread
    density = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    # 2 Phi(z) - 1 = erf(z / sqrt 2), which keeps full precision in the tails.
    crps = spread * (z * _erf(z / math.sqrt(2.0)) + 2.0 * density - 1.0 / math.sqrt(math.pi))
    return float(np.mean(crps))
