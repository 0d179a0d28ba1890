"""Regularisers on the learned embeddings."""
from __future__ import annotations

import torch


def offset_l2(offset: torch.Tensor) -> torch.Tensor:
    """Mean squared offset from the initializer word.  offset: [B, K, D] -> [B]"""
    return offset.float().pow(2).flatten(1).mean(1)
