"""The L-GreCo choice as a pure function: per-layer settings with the fewest bytes whose total
error stays within a budget (a multiple-choice knapsack, solved by dynamic programming).

Given for every layer ``l`` and candidate ``c`` a size ``sizes[l][c]`` (bytes sent) and an error
``errors[l][c]``, :func:`solve` returns one candidate per layer minimising ``sum sizes`` subject to
``sum errors <= budget``. Errors are discretised in units of ``budget / resolution`` and rounded
**up**, so a DP state's unit count bounds its real error from above; the axis has one spare unit
per layer so the uniform choice (whose rounded errors may add up to ``L`` units past the budget)
always stays representable, and an answer is accepted only if its *exact* error is within the
budget. Rounding up costs at most ``L / resolution`` of the budget.

If no combination fits (or the table holds NaN/inf where it matters), the caller's fallback
candidate (normally the uniform setting) is returned: the controller never makes things worse
than uniform, and every rank, solving the same table, reaches the same answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # candidate index per layer
    total_bytes: float
    total_error: float
    used_fallback: bool


def evaluate(sizes: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], choices: Sequence[int]) -> tuple[float, float]:
    """Total bytes and total error of one choice per layer."""
    return (
        float(sum(sizes[layer][choice] for layer, choice in enumerate(choices))),
        float(sum(errors[layer][choice] for layer, choice in enumerate(choices))),
    )


def solve(
    sizes: Sequence[Sequence[float]],
    errors: Sequence[Sequence[float]],
    budget: float,
    fallback: Sequence[int],
    resolution: int = 10_000,
) -> Solution:
    """Fewest total bytes with total error <= ``budget``; ``fallback`` if nothing better fits.

    Args:
        sizes, errors: ``[layer][candidate]`` tables of equal shape (candidates may differ in
            number per layer). Non-finite errors mark a candidate as unusable.
        budget: the error budget (e.g. the uniform setting's total error times alpha).
        fallback: one candidate index per layer, returned when the DP finds nothing feasible or
            nothing cheaper than it.
        resolution: number of units the budget is split into.
    """
    layers = len(sizes)
    if layers != len(errors) or layers != len(fallback):
        raise ValueError("sizes, errors and fallback must have one entry per layer")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1; got {resolution}")
    for layer in range(layers):
        if len(sizes[layer]) == 0 or len(sizes[layer]) != len(errors[layer]):
            raise ValueError(f"layer {layer}: need a non-empty candidate list with one size and one error each")
    fallback_bytes, fallback_error = evaluate(sizes, errors, fallback)
    fallback_solution = Solution(tuple(int(c) for c in fallback), fallback_bytes, fallback_error, True)
    if layers == 0 or not math.isfinite(budget) or budget < 0:
        return fallback_solution

    unit = budget / resolution if budget > 0 else 1.0
    # Errors round up to whole units, so a choice using b units has real error <= b * unit. The
    # axis gets one spare unit per layer so the uniform choice (real error == budget at alpha 1,
    # up to L units after rounding) is always representable; end points beyond ``resolution``
    # are accepted only if their real error is within the budget.
    capacity = (resolution + layers) if budget > 0 else 0
    units = [[_units(error, unit) for error in layer_errors] for layer_errors in errors]
    best = np.full(capacity + 1, math.inf)  # best[b]: fewest bytes so far using exactly b units
    best[0] = 0.0
    parents: list[np.ndarray] = []
    for layer in range(layers):
        new_best = np.full(capacity + 1, math.inf)
        parent = np.full(capacity + 1, -1, dtype=np.int64)
        for candidate, size in enumerate(sizes[layer]):
            cost = units[layer][candidate]
            if cost is None or cost > capacity or not math.isfinite(size):
                continue
            shifted = np.full(capacity + 1, math.inf)
            shifted[cost:] = best[: capacity + 1 - cost] + size
            better = shifted < new_best
            new_best[better] = shifted[better]
            parent[better] = candidate
        best = new_best
        parents.append(parent)

    for end in np.argsort(best, kind="stable"):
        if not math.isfinite(best[end]):
            break
        choices = _backtrack(parents, units, int(end))
        total_bytes, total_error = evaluate(sizes, errors, choices)
        if total_error <= budget:
            if total_bytes >= fallback_bytes and fallback_error <= budget:
                return fallback_solution
            return Solution(tuple(choices), total_bytes, total_error, False)
    return fallback_solution


def _units(error: float, unit: float) -> int | None:
    """Whole budget units an error takes (rounded up); None for an unusable candidate."""
    if not math.isfinite(error) or error < 0:
        return None
    return math.ceil(error / unit) if error > 0 else 0


def _backtrack(parents: list[np.ndarray], units: list[list[int | None]], end: int) -> list[int]:
    choices = [0] * len(parents)
    position = end
    for layer in range(len(parents) - 1, -1, -1):
        candidate = int(parents[layer][position])
        choices[layer] = candidate
        position -= units[layer][candidate]
    return choices
