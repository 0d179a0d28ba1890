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


def identity_loss(codes: torch.Tensor, object_index: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrast (SupCon) within a batch: codes [B, Z], object_index [B] -> [B].

    Each sample's code must pick out the other samples of its object (never itself) among all
    the others; 0 for a sample whose object appears once in the batch."""
    z = F.normalize(codes.float(), dim=-1)
    logits = z @ z.T / temperature                                            # [B, B]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positive = (object_index[:, None] == object_index[None]) & ~eye
    logits = logits.masked_fill(eye, -1e9)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positive.sum(1)
    loss = -(log_prob * positive).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, loss, torch.zeros_like(loss))
