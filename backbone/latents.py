"""VAE latents of a batch's images, with an optional cache the run owns."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.utils.torch_utils import randn_tensor


class LatentCache:
    """Each (object, view, flip)'s latent mean/std, computed once. A run owns one when it sees the
    same views many times (data.cache_latents; tune.py on unjittered views) and passes it to
    `encode_latents`; the sample is still drawn from the step's generator, so a cached run equals
    an uncached one."""

    def __init__(self):
        self.moments: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.moments)

    def distribution(self, vae, images: torch.Tensor, batch: dict) -> SimpleNamespace:
        keys = list(zip(batch["object_index"].tolist(), batch["view_index"].tolist(), batch["flipped"].tolist()))
        missing = [i for i, k in enumerate(keys) if k not in self.moments]
        if missing:
            fresh = vae.encode(images[missing]).latent_dist
            for j, i in enumerate(missing):      # clones: views would keep the whole VAE output alive
                self.moments[keys[i]] = (fresh.mean[j].clone(), fresh.std[j].clone())
        return SimpleNamespace(mean=torch.stack([self.moments[k][0] for k in keys]),
                               std=torch.stack([self.moments[k][1] for k in keys]))


def encode_latents(backbone, batch: dict, generator: torch.Generator | None = None,
                   cache: LatentCache | None = None) -> torch.Tensor:
    """VAE latents of the batch's images, scaled, sampled from the encoder's distribution.
    -> [B, 4, h, w] fp32. A batch without view indices is never cached."""
    vae, device = backbone.vae, next(backbone.unet.parameters()).device
    images = batch["image"].to(device, vae.dtype)
    if cache is None or "view_index" not in batch:
        dist = vae.encode(images).latent_dist
    else:
        dist = cache.distribution(vae, images, batch)
    noise = randn_tensor(dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
    return (dist.mean + dist.std * noise).float() * vae.config.scaling_factor
