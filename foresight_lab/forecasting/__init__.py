"""Forecasting: answer types and forecasts from the model's distribution (`forecast`),
research sources (`research`), scores (`metrics`), resolved questions (`questions`) and
evaluation runs with calibration (`evaluate`)."""

from foresight_lab.forecasting.evaluate import (
    CalibrationReport,
    Calibrator,
    Evaluation,
    evaluate,
)
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
from foresight_lab.forecasting.questions import ResolvedQuestion, load_questions

__all__ = [
    "CalibrationReport",
    "Calibrator",
    "Evaluation",
    "ResolvedQuestion",
    "evaluate",
    "load_questions",
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
