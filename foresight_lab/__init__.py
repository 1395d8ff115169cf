"""foresight-lab: run language models in a JAX/Flax engine, from a notebook or over HTTP."""

from foresight_lab.engine.engine import Engine
from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.engine.request import (
    Completion,
    Delta,
    InvalidRequestError,
    SamplingOptions,
    Usage,
)
from foresight_lab.engine.sharding import make_mesh
from foresight_lab.forecasting import (
    Calibrator,
    Evaluation,
    ResolvedQuestion,
    evaluate,
    load_questions,
)
from foresight_lab.forecasting.forecast import PredictionResult
from foresight_lab.lab import Lab, NextTokenDistribution, load
from foresight_lab.weights.loader import LoadedModel, load_model
from foresight_lab.weights.registry import BUILTIN_MODELS, DEFAULT_MODEL, ModelNotFoundError, pull

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "Calibrator",
    "Evaluation",
    "PredictionResult",
    "ResolvedQuestion",
    "evaluate",
    "load_questions",
    "DEFAULT_MODEL",
    "Completion",
    "Delta",
    "Engine",
    "EngineConfig",
    "InvalidRequestError",
    "Lab",
    "LoadedModel",
    "NextTokenDistribution",
    "ModelNotFoundError",
    "SamplingOptions",
    "Usage",
    "load",
    "load_model",
    "make_mesh",
    "pull",
]
