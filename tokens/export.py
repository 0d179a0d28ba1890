"""Learned words as files in diffusers' textual-inversion format (`pipe.load_textual_inversion`)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from checkpointing import atomic_write


def save_token(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """vectors: [K, D]. Writes {token: [K, D]} as safetensors, atomically."""
    path = Path(path)
    tensors = {token: vectors.detach().float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def load_token(path: str | Path) -> tuple[str, torch.Tensor]:
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one token, found keys {sorted(tensors)}")
    (token, vectors), = tensors.items()
    return token, vectors
