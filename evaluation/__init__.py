"""Evaluation of runs: image metrics, attention metrics, sweeps' reports.

Named `evaluation`, not `evaluate`, so it does not shadow Hugging Face's `evaluate` package.
CLI: `python -m evaluation RUN [RUN ...]`.
"""
