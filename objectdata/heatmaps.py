"""Keypoint heatmaps: soft targets/weights for where an object's keypoints are in an image."""

from __future__ import annotations

import torch

__all__ = ["has_keypoints", "keypoint_heatmaps"]


def has_keypoints(valid: torch.Tensor) -> torch.Tensor:
    """valid [B,K] bool -> [B] bool: whether each sample has at least one valid keypoint."""
    if valid.dim() != 2:
        raise ValueError(f"valid must be [B,K], got {tuple(valid.shape)}")
    return valid.bool().any(dim=-1)


def keypoint_heatmaps(keypoints: torch.Tensor, valid: torch.Tensor, size: int,
                      sigma: float = 0.06) -> torch.Tensor:
    """Max over valid keypoints of Gaussian blobs exp(-d^2 / 2 sigma^2) -> [B,1,size,size].

    keypoints [B,K,2] normalised (x right, y down, in [0,1]); valid [B,K] bool. d and sigma are
    in normalised image units, so the map looks the same at any size; pixel (i, j) is sampled at
    its centre ((j + 0.5) / size, (i + 0.5) / size). A sample without a valid keypoint gets an
    all-zero map. Float dtype follows keypoints; no gradient tricks, just torch ops.
    """
    if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must be [B,K,2], got {tuple(keypoints.shape)}")
    if valid.shape != keypoints.shape[:2]:
        raise ValueError(f"valid must be [B,K] = {tuple(keypoints.shape[:2])}, got {tuple(valid.shape)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    dtype = keypoints.dtype if keypoints.is_floating_point() else torch.float32
    keypoints = keypoints.to(dtype)
    valid = valid.to(device=keypoints.device, dtype=torch.bool)
    b, k = valid.shape
    centres = (torch.arange(size, device=keypoints.device, dtype=dtype) + 0.5) / size  # [S]
    heatmap = torch.zeros(b, size, size, device=keypoints.device, dtype=dtype)
    scale = -0.5 / (sigma * sigma)
    for index in range(k):  # running max: memory B*S*S whatever K is
        x, y = keypoints[:, index, 0], keypoints[:, index, 1]  # [B]
        gx = torch.exp(scale * (centres[None, :] - x[:, None]) ** 2)  # [B,S] over columns
        gy = torch.exp(scale * (centres[None, :] - y[:, None]) ** 2)  # [B,S] over rows
        blob = gy[:, :, None] * gx[:, None, :]  # [B,S,S] = exp(-d^2 / 2 sigma^2), separable
        blob = blob * valid[:, index, None, None].to(dtype)
        heatmap = torch.maximum(heatmap, blob)
    return heatmap[:, None]
