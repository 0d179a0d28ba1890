"""Guidance losses on a token's cross-attention map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_ATTENTION_VARIANTS = ("mse_maxnorm", "mass_ratio")


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """[B, 1, H, W] -> [B, h, w], area-averaged (soft at the border)."""
    return F.interpolate(mask.float(), size=tuple(size), mode="area").squeeze(1)


def attention_mass_inside(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the map's total mass that falls inside the mask.

    attn: [B, h, w] (non-negative); mask: [B, 1, H, W].  Returns [B] in [0, 1].
    """
    m = resize_mask(mask, attn.shape[-2:])
    return (attn * m).flatten(1).sum(1) / attn.flatten(1).sum(1).clamp(min=1e-12)


def mask_attention_loss(attn: torch.Tensor, mask: torch.Tensor, variant: str = "mse_maxnorm") -> torch.Tensor:
    """Pull a token's cross-attention map toward the object mask.

    attn: [B, h, w] attention probability of the token at each latent pixel; mask: [B, 1, H, W].
    - "mse_maxnorm": map / its max, MSE against the mask resized to h x w (Break-A-Scene, seeds).
    - "mass_ratio": (1 - mass inside the mask)^2; invariant to the map's overall scale.
    Returns [B].
    """
    if variant == "mse_maxnorm":
        m = resize_mask(mask, attn.shape[-2:])
        peak = attn.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
        return (attn / peak - m).pow(2).flatten(1).mean(1)
    if variant == "mass_ratio":
        return (1.0 - attention_mass_inside(attn, mask)).pow(2)
    raise ValueError(f"mask attention variant must be one of {MASK_ATTENTION_VARIANTS}, got {variant!r}")


def attention_iou(attn: torch.Tensor, mask: torch.Tensor, threshold: float | str = "mean") -> torch.Tensor:
    """IoU of the thresholded map against the mask.  attn [B, h, w], mask [B, 1, H, W] -> [B]

    threshold "mean": pixels that get more than their share of the token's attention (no
    tuning, robust for broad maps); a float: that fraction of the map's maximum.
    """
    m = resize_mask(mask, attn.shape[-2:]) > 0.5
    flat = attn.flatten(1)
    level = flat.mean(1) if threshold == "mean" else float(threshold) * flat.amax(1)
    a = attn > level[:, None, None]
    inter = (a & m).flatten(1).sum(1).float()
    union = (a | m).flatten(1).sum(1).float().clamp(min=1)
    return inter / union
