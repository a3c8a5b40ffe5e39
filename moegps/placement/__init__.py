"""Expert placement: which GPU slot holds which expert, replicas included, and how tokens split."""

from .placement import Placement, PlacementError

__all__ = ["Placement", "PlacementError"]
