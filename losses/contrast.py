"""Word contrast: a word must explain its own object's image better than another object's word does."""
from __future__ import annotations

import torch


def contrast_loss(own: torch.Tensor, swapped: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Hinge on the log ratio of two denoising errors of the same noisy latent.

    own: [B] denoising error with the sample's own word; swapped: [B] the same prompt, noise and
    timestep with another object's word in its place. -> [B] relu(margin + log own - log swapped):
    zero once the wrong word is exp(margin) times worse. Only differences between words get a
    gradient: a word shared by every object scores exactly margin, so a constant word cannot meet it.
    """
    eps = 1e-8
    return torch.relu(margin + torch.log(own.float() + eps) - torch.log(swapped.float() + eps))
