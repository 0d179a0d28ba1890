"""argparse `type=` checks shared by the entry points (generate, export, tune, evaluation): a bad
number is refused by argparse itself (usage, one error line naming the flag, exit code 2), before
any model loads or anything is written.

    p.add_argument("--steps", type=positive_int, default=20)
"""
from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(parse, ok, wanted: str):
    """A `type=` function: parse the text, then refuse a value that is not `wanted`."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return check


positive_int = _checked(_int, lambda v: v >= 1, "a whole number >= 1")          # counts: samples, steps, batches
finite_float = _checked(_float, lambda v: True, "a finite number")               # no nan, no inf
non_negative_float = _checked(_float, lambda v: v >= 0, "a finite number >= 0")
positive_float = _checked(_float, lambda v: v > 0, "a finite number > 0")        # learning rates


def word_strength(text: str) -> tuple[str, float]:
    """NAME=VALUE (e.g. shape=1.5): a concept's strength at generation."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. shape=1.5), got {text!r}")
    return name.strip(), finite_float(value)


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (when CUDA is there), mps."""
    import torch
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:0, mps)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device on this machine (use cpu)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine (use cpu)")
    return text
