"""Example workloads used by the README's main job, the benchmarks and the tests."""
