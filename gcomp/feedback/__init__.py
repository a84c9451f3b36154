"""Error-feedback rules: per-layer state machines that make biased compressors converge."""
from .rules import (
    EF14,
    EF21,
    EF21SGDM,
    ERROR,
    ESTIMATE,
    FEEDBACK_NAMES,
    LOCAL_ESTIMATE,
    MOMENTUM,
    EControl,
    Exchange,
    FeedbackRule,
    FeedbackUpdate,
    make_feedback_rule,
)

__all__ = [
    "EF14",
    "EF21",
    "EF21SGDM",
    "ERROR",
    "ESTIMATE",
    "FEEDBACK_NAMES",
    "LOCAL_ESTIMATE",
    "MOMENTUM",
    "EControl",
    "Exchange",
    "FeedbackRule",
    "FeedbackUpdate",
    "make_feedback_rule",
]
