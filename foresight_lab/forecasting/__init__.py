"""Forecasting: scoring and calibration of probabilistic forecasts (`metrics`)."""

from foresight_lab.forecasting.metrics import (
    CalibrationCurve,
    brier_score,
    brier_skill_score,
    calibration_curve,
    crps_gaussian,
    expected_calibration_error,
    log_score,
    multiclass_brier_score,
    multiclass_log_score,
    reliability_diagram,
)

__all__ = [
    "CalibrationCurve",
    "brier_score",
    "brier_skill_score",
    "calibration_curve",
    "crps_gaussian",
    "expected_calibration_error",
    "log_score",
    "multiclass_brier_score",
    "multiclass_log_score",
    "reliability_diagram",
]
