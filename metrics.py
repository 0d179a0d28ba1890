"""Measurements of what a word learned, at a fixed noise level (no sampling needed)."""
from __future__ import annotations

import torch

from guided_concepts.losses import attention_iou, attention_mass_inside


@torch.no_grad()
def attention_mask_metrics(system, batch: dict, prompts: list[str], timestep: int = 100, seed: int = 0,
                           return_maps: bool = False):
    """For every attention concept: the mass of its cross-attention inside the object mask, and
    the IoU of its map thresholded at its mean (pixels with more than their share), on `batch` noised to `timestep`.

    Returns {"<concept>/mass_inside": [B], "<concept>/iou": [B]} (and the maps [B, C, h, w] when
    `return_maps`).
    """
    backbone = system.backbone
    device = next(backbone.unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    latents = backbone.vae.encode(batch["image"].to(device, backbone.vae.dtype)).latent_dist.mode().float() * backbone.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    t = torch.full((latents.shape[0],), timestep, device=device, dtype=torch.long)
    noisy = backbone.scheduler.add_noise(latents, noise, t)
    text, selection, pooled = system.text_conditioning(prompts, system.encode(batch))
    added = system.backbone.added_conditioning(pooled, batch, batch["image"].shape[-1])
    _, maps = system.unet_with_attention(noisy.float(), t, text, selection, added=added)   # maps [B, C, h, w]
    system.store.end()
    mask = batch["mask"].to(device)
    out = {}
    for i, name in enumerate(system.attention_concepts):
        out[f"{name}/mass_inside"] = attention_mass_inside(maps[:, i], mask).cpu()
        out[f"{name}/iou"] = attention_iou(maps[:, i], mask).cpu()
    return (out, maps.cpu()) if return_maps else out


def variance_ratio(vectors: torch.Tensor, groups: torch.Tensor) -> float:
    """Within-group ÷ between-group variance of word vectors.

    vectors [N, ...] (flattened per sample), groups [N] int (object id for *s, camera id for *p).
    Small means the word depends on the group and little else (e.g. *s the same across one
    object's views). Groups with a single member are skipped for the within part.
    """
    x = vectors.float().flatten(1)
    ids = groups.unique()
    means = torch.stack([x[groups == g].mean(0) for g in ids])                          # [G, F]
    within = [(x[groups == g] - means[i]).pow(2).sum(1).mean() for i, g in enumerate(ids)
              if (groups == g).sum() > 1]
    between = (means - means.mean(0)).pow(2).sum(1).mean()
    return (torch.stack(within).mean() / between.clamp(min=1e-12)).item()


class RunningMeans:
    """Per-term sums between two log lines (EDM's training_stats, in small): add() every batch,
    means() at a log line (over every process when given accelerate's gather_object), reset()
    after it. `sums`/`count` go into each checkpoint, so a resumed run logs the same means."""

    def __init__(self, sums: dict | None = None, count: int = 0):
        self.sums, self.count = dict(sums or {}), count

    def add(self, terms: dict, loss: torch.Tensor) -> None:
        """terms: name -> (weight, per-sample values [B]); the unweighted batch mean is summed."""
        for name, (_, value) in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float().mean().item()
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.item()
        self.count += 1

    def means(self, gather=None) -> dict:
        means = {k: v / self.count for k, v in self.sums.items()}
        if gather is None:
            return means
        ranks = gather([means])         # every process's batches, not just this one's
        return {k: sum(r.get(k, 0.0) for r in ranks) / sum(k in r for r in ranks)
                for k in sorted({k for r in ranks for k in r})}

    def reset(self) -> None:
        self.sums, self.count = {}, 0
