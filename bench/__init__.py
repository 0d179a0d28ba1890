"""Benchmarks (scripts, not tests): python -m bench.step_cost, python -m bench.floor, python -m bench.large_images."""
