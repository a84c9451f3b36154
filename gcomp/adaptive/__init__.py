"""Per-layer settings chosen while training: L-GreCo (ranks / densities / bit widths by dynamic
programming over measured errors) and the time-aware choice (dense or compressed by predicted step time)."""
from .controller import AdaptiveConfig, AdaptiveController
from .solver import Solution, solve
from .timeaware import TimeAwareConfig, TimeAwareController

__all__ = ["AdaptiveConfig", "AdaptiveController", "Solution", "TimeAwareConfig", "TimeAwareController", "solve"]
