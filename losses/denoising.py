"""Denoising loss against the scheduler's target."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: epsilon (SD 1.x) or v (SD 2.x 768), read from the scheduler config."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   normalize: str = "area") -> torch.Tensor:
    """Per-sample MSE.

    pred, target: [B, C, h, w]; mask: [B, 1, H, W] in [0, 1] (resized to h x w) or None.
    normalize: "area" divides the masked error by the mask's area (every object counts the same,
    small or large); "mean" averages over all pixels (small objects count less).
    Returns [B].
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)   # [B, 1, h, w]
    if mask is None:
        return err.flatten(1).mean(1)
    mask = F.interpolate(mask.float(), size=err.shape[-2:], mode="area")    # [B, 1, h, w]
    masked = (err * mask).flatten(1).sum(1)
    if normalize == "area":
        return masked / mask.flatten(1).sum(1).clamp(min=1e-6)
    if normalize == "mean":
        return masked / mask[0].numel()
    raise ValueError(f"normalize must be 'area' or 'mean', got {normalize!r}")
