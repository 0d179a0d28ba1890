"""KL divergence of a diagonal Gaussian code toward N(0, I)."""
from __future__ import annotations

import torch


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over the code's dimensions.  [B, Z] -> [B]"""
    return 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).mean(-1)
