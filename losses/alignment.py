"""Tie two embeddings of the same object (e.g. the mask branch's and the image branch's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGNMENT_KINDS = ("cosine", "infonce")


def alignment_loss(a: torch.Tensor, b: torch.Tensor, object_index: torch.Tensor | None = None,
                   kind: str = "infonce", temperature: float = 0.1) -> torch.Tensor:
    """a, b: [B, Z] two views of each sample's code; object_index [B] marks which samples show
    the same object (positives for InfoNCE). Returns [B].

    - "cosine": 1 - cos(a_i, b_i).
    - "infonce": cross-entropy of a_i picking b_j of its own object among the batch (symmetric).
    """
    if kind == "cosine":
        return 1 - F.cosine_similarity(a.float(), b.float(), dim=-1)
    if kind != "infonce":
        raise ValueError(f"alignment kind must be one of {ALIGNMENT_KINDS}, got {kind!r}")
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature                                           # [B, B]
    ids = object_index if object_index is not None else torch.arange(len(a), device=a.device)
    positive = (ids[:, None] == ids[None]).float()                           # [B, B]
    def nce(l):
        return -(torch.logsumexp(l.masked_fill(positive == 0, -1e9), 1) - torch.logsumexp(l, 1))
    return 0.5 * (nce(logits) + nce(logits.T))
