"""Routing predictors: distribution-only and token-to-expert, each with its cost (see ``base``).

``make(name, **kwargs)`` builds one by registry name; ``moegps/conf/predictor/<name>.yaml`` names the same
classes for hydra. ``evaluate`` scores them on a trace; ``bench`` measures their overheads.
"""

from . import distribution, signature, tokens  # noqa: F401  (registers the predictors)
from .base import (
    REGISTRY,
    BatchContext,
    DistributionPredictor,
    PredictorCost,
    TokenBatch,
    TokenPredictor,
    make,
)
from .distribution import loads_from_experts

__all__ = [
    "REGISTRY", "BatchContext", "DistributionPredictor", "PredictorCost", "TokenBatch", "TokenPredictor",
    "make", "loads_from_experts",
]
