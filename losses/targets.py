"""Word targets: pull a head's word toward a per-object target word (HyperDreamBooth's regression
onto per-object inversions; here the targets are the run's own words after E4T-style tuning)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def word_target_loss(embeds: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """embeds, targets: [B, K, D]; valid: [B] (0 where the object has no target) -> [B].

    1 - cosine, averaged over the K vectors: the direction only, since words of a fixed norm
    differ only in direction (and a free word's target norm is not what a loss should chase).
    """
    cosine = F.cosine_similarity(embeds.float(), targets.float().to(embeds.device), dim=-1)   # [B, K]
    return (1.0 - cosine).mean(dim=-1) * valid.float().to(embeds.device)
