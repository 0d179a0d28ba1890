"""The training objective: one call returns every loss term of a step, per sample (DiT's
`training_losses`). The denoising loss, each word's guidance losses, the word contrast and the
word-target terms; the caller weights and reduces them."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from guided_concepts.backbone.latents import LatentCache, encode_latents
from guided_concepts.concepts import StepView
from guided_concepts.losses import contrast_loss, denoising_loss, denoising_target, word_target_loss
from guided_concepts.objectdata.sampling import contrast_partners, partner_weights


def training_losses(system, batch: dict, prompts: list[str], generator: torch.Generator | None = None,
                    present: dict[str, torch.Tensor] | None = None, encoded: dict | None = None,
                    timesteps: int | None = None,
                    latent_cache: LatentCache | None = None) -> dict[str, tuple[float, torch.Tensor]]:
    """All loss terms of one step: name -> (weight, per-sample values [B]). The caller reduces.

    present: word -> bool [B], which prompts use the word (union sampling); a word's guidance
    losses count only where its prompt uses it.
    encoded: the heads' outputs when the caller ran them (through DDP); else they run here.
    timesteps: one fixed timestep for every sample (evaluation); default: uniformly random.
    latent_cache: the run's cache of VAE latents (data.cache_latents), or None.
    """
    backbone = system.backbone
    device = next(backbone.unet.parameters()).device
    with torch.no_grad():
        latents = encode_latents(backbone, batch, generator, latent_cache)           # [B, 4, h, w]
    # Random draws on the generator's device (CPU by default), then moved: works on any device.
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, backbone.scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator).to(device)
    if timesteps is not None:
        t = torch.full_like(t, timesteps)
    noisy = backbone.scheduler.add_noise(latents, noise, t)

    encoded = encoded if encoded is not None else system.heads(batch)
    text, selection, pooled = system.text_conditioning(prompts, encoded)
    added = backbone.added_conditioning(pooled, batch, batch["image"].shape[-1])
    capture = any(system.heads[n].trains_attention() for n in system.attention_concepts)
    pred, maps = system.unet_with_attention(noisy, t, text, selection, capture, added)
    attention = {n: maps[:, i] for i, n in enumerate(system.attention_concepts)} if maps is not None else None
    target = denoising_target(backbone.scheduler, latents, noise, t)

    losses = {"denoise": (1.0, denoising_loss(pred, target))}
    same_object = same_camera = None
    if "object_index" in batch and "camera" in batch:
        same_object, same_camera = partner_weights(batch["object_index"], batch["camera"],
                                                   batch.get("canonical_camera", batch["has_camera"]))
    # What one UNet pass gives every word's guidance losses (the concept contract's StepView).
    step = StepView(timesteps=t, attention=attention, pred=pred, target=target,
                    same_object=same_object, same_camera=same_camera)
    for n, out in encoded.items():
        used = present[n].to(device).float() if present is not None else None
        for name, (weight, value) in system.heads[n].guidance_losses(out, batch, step).items():
            losses[f"{n}/{name}"] = (weight, value * used if used is not None else value)
    losses.update(contrast_losses(system, batch, prompts, encoded, noisy, t, target, losses["denoise"][1], present,
                                  generator))
    losses.update(target_losses(system, batch, encoded))
    return losses


def target_losses(system, batch: dict, encoded: dict) -> dict:
    """Word targets (a concept's loss config `target_weight` > 0): each word against its
    object's target word; objects without one (held out, new) contribute 0."""
    losses = {}
    for n, out in encoded.items():
        weight = system.heads[n].loss_config.target_weight
        if weight <= 0 or n not in system.word_targets or "object_name" not in batch:
            continue
        words = system.word_targets[n]
        targets = torch.stack([words.get(o, torch.zeros_like(out.embeds[0])).to(out.embeds.device)
                               for o in batch["object_name"]])                         # [B, K, D]
        valid = torch.tensor([o in words for o in batch["object_name"]])
        losses[f"{n}/word_target"] = (weight, word_target_loss(out.embeds, targets, valid))
    return losses


def contrast_losses(system, batch: dict, prompts: list[str], encoded: dict, noisy: torch.Tensor, t: torch.Tensor,
                    target: torch.Tensor, own: torch.Tensor, present: dict | None, generator) -> dict:
    """Word contrast (a concept's loss config `contrast_weight` > 0): one such word per step,
    drawn at random, is replaced in every prompt by another object's (objectdata's
    contrast_partners), the UNet runs again on the same noisy latents, and the word pays when
    its own object's image is not explained better than with the other's. One extra UNet pass.
    own: the denoising loss with the object's own words [B]."""
    weights = {n: system.heads[n].loss_config.contrast_weight for n in encoded}
    names = [n for n, w in weights.items() if w > 0]
    if not names or "object_index" not in batch:
        return {}
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    partners = contrast_partners(batch["object_index"], batch["camera"],
                                 batch.get("canonical_camera", batch["has_camera"]), generator)
    swapped = {n: SimpleNamespace(embeds=o.embeds[partners.to(o.embeds.device)] if n == name else o.embeds)
               for n, o in encoded.items()}
    text, selection, pooled = system.text_conditioning(prompts, swapped)
    added = system.backbone.added_conditioning(pooled, batch, batch["image"].shape[-1])
    pred, _ = system.unet_with_attention(noisy, t, text, selection, capture=False, added=added)
    value = contrast_loss(own, denoising_loss(pred, target), system.heads[name].loss_config.contrast_margin)
    valid = (partners.to(value.device) != torch.arange(len(value), device=value.device)).float()
    if present is not None:
        valid = valid * present[name].to(value.device).float()
    # Logged for every contrast word (0 on steps it was not drawn), so log lines keep their keys.
    return {f"{n}/contrast": (weights[n] * len(names), value * valid if n == name else torch.zeros_like(value))
            for n in names}
