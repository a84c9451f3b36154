"""L-GreCo: layer-wise adaptive choice of PowerSGD ranks / top-k densities by dynamic programming."""
from .controller import AdaptiveConfig, AdaptiveController
from .solver import Solution, solve

__all__ = ["AdaptiveConfig", "AdaptiveController", "Solution", "solve"]
