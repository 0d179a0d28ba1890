"""Per-object target words in one safetensors file: key "<concept>/<object name>" -> [K, D]."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def save_word_targets(path: Path | str, targets: dict[str, dict[str, torch.Tensor]], metadata: dict | None = None):
    """targets: concept -> object name -> word [K, D]."""
    flat = {f"{c}/{o}": w.detach().float().cpu().contiguous() for c, words in targets.items() for o, w in words.items()}
    save_file(flat, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_word_targets(path: Path | str, concepts: list[str], shapes: dict[str, tuple[int, int]]) -> dict:
    """-> concept -> object name -> [K, D] for `concepts`; ValueError naming the file if it cannot be
    read, lacks a concept, or holds words of another size (shapes: concept -> (K, D))."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"train.word_targets: {path} does not exist (write it with tune.py --run <run> --targets {path})")
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"train.word_targets: {path} is not a readable safetensors file ({err})") from err
    targets = {c: {} for c in concepts}
    for key, word in flat.items():
        concept, _, name = key.partition("/")
        if concept in targets:
            if tuple(word.shape) != tuple(shapes[concept]):
                raise ValueError(f"train.word_targets: {path}: {key} is {tuple(word.shape)}, the {concept} word is "
                                 f"{tuple(shapes[concept])} (targets from another model or num_vectors?)")
            targets[concept][name] = word
    for concept, words in targets.items():
        if not words:
            raise ValueError(f"train.word_targets: {path} has no {concept} words (losses.{concept}.target_weight > 0)")
    return targets
