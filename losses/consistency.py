"""Consistency between the words of partner samples (same object, or same camera)."""
from __future__ import annotations

import torch


def consistency_loss(vectors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each sample's vectors to its partners'.

    vectors: [B, K, D]; partners: [B, B] bool (partners[i, j]: j should match i).
    Returns [B]; 0 for a sample without partners.
    """
    flat = vectors.float().flatten(1)                                   # [B, K*D]
    dist = (flat[:, None] - flat[None]).pow(2).mean(-1)                 # [B, B]
    weights = partners.float()
    return (dist * weights).sum(1) / weights.sum(1).clamp(min=1)
