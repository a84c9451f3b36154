"""The L-GreCo dynamic program against brute force (no process group)."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcomp.adaptive.solver import evaluate, solve


def _brute_force(sizes, errors, budget):
    best = None
    for choices in itertools.product(*[range(len(layer)) for layer in sizes]):
        total_bytes, total_error = evaluate(sizes, errors, choices)
        if total_error <= budget and (best is None or total_bytes < best):
            best = total_bytes
    return best


def _random_problem(seed, layers, candidates):
    rng = np.random.default_rng(seed)
    sizes, errors = [], []
    for _ in range(layers):
        count = int(rng.integers(1, candidates + 1))
        # more bytes, less error: the usual trade-off, with noise so it is not monotone everywhere
        size = np.sort(rng.integers(1, 1000, count)).astype(float)
        error = np.sort(rng.random(count) * 10)[::-1] + rng.random(count)
        sizes.append(size.tolist())
        errors.append(error.tolist())
    fallback = [len(layer) // 2 for layer in sizes]
    return sizes, errors, fallback


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 6), candidates=st.integers(1, 4), alpha=st.floats(0.5, 1.5))
def test_dp_matches_brute_force_and_respects_budget(seed, layers, candidates, alpha):
    sizes, errors, fallback = _random_problem(seed, layers, candidates)
    budget = alpha * evaluate(sizes, errors, fallback)[1]
    resolution = 100_000
    solution = solve(sizes, errors, budget, fallback, resolution=resolution)
    exact = _brute_force(sizes, errors, budget)
    if exact is None:
        assert solution.used_fallback
        return
    assert solution.total_error <= budget  # the real (not discretised) error is within budget
    assert solution.total_bytes >= exact
    # Rounding up costs at most one unit per layer of the budget:
    tighter = _brute_force(sizes, errors, budget - layers * budget / resolution)
    if tighter is not None:
        assert solution.total_bytes <= tighter


def test_exact_when_errors_are_whole_units():
    rng = np.random.default_rng(7)
    for _ in range(200):
        layers = int(rng.integers(1, 7))
        sizes = [rng.integers(1, 50, 4).astype(float).tolist() for _ in range(layers)]
        errors = [rng.integers(0, 20, 4).astype(float).tolist() for _ in range(layers)]
        budget = float(rng.integers(0, 20 * layers))
        fallback = [0] * layers
        solution = solve(sizes, errors, budget, fallback, resolution=max(1, int(budget)))
        exact = _brute_force(sizes, errors, budget)
        if exact is None:
            assert solution.used_fallback
        else:
            assert solution.total_bytes == exact and solution.total_error <= budget


def test_single_candidate_gives_uniform():
    sizes = [[10.0], [20.0], [30.0]]
    errors = [[1.0], [2.0], [3.0]]
    solution = solve(sizes, errors, 6.0, [0, 0, 0])
    assert solution.choices == (0, 0, 0) and solution.total_bytes == 60.0


def test_uniform_always_feasible_at_alpha_one():
    # Errors that do not divide the unit: rounding up must not make the uniform choice infeasible.
    sizes = [[1.0, 5.0, 9.0]] * 5
    errors = [[3.3333, 1.1111, 0.3333]] * 5
    solution = solve(sizes, errors, evaluate(sizes, errors, [1] * 5)[1], [1] * 5, resolution=7)
    assert solution.total_error <= evaluate(sizes, errors, [1] * 5)[1]
    assert solution.total_bytes <= 25.0


def test_non_finite_errors_fall_back_or_avoid():
    sizes = [[1.0, 2.0], [1.0, 2.0]]
    errors = [[math.nan, 1.0], [math.inf, 1.0]]
    solution = solve(sizes, errors, 2.0, [1, 1])
    assert solution.choices == (1, 1)
    nan_budget = solve(sizes, errors, math.nan, [1, 1])
    assert nan_budget.used_fallback and nan_budget.choices == (1, 1)


@pytest.mark.parametrize("sizes, errors, fallback", [([[1.0]], [[1.0], [2.0]], [0]), ([[]], [[]], [0])])
def test_malformed_tables_raise(sizes, errors, fallback):
    with pytest.raises(ValueError):
        solve(sizes, errors, 1.0, fallback)
