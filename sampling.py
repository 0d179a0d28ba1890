"""Sampling with the learned words: the backbone as a stock diffusers pipeline (SD or SDXL, DDIM),
prompts encoded with the words, each word's cross-attention averaged over the denoising steps."""
from __future__ import annotations

import copy

import torch


def pipeline(system):
    """The system's backbone as a stock diffusers pipeline (SD or SDXL) with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    backbone = system.backbone
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    (tokenizer, text_encoder), *second = backbone.text_side
    if backbone.is_sdxl:
        zeros = backbone.pipeline_setting("force_zeros_for_empty_prompt", True)
        pipe = StableDiffusionXLPipeline(vae=backbone.vae, text_encoder=text_encoder, text_encoder_2=second[0][1],
                                         tokenizer=tokenizer, tokenizer_2=second[0][0], unet=backbone.unet,
                                         scheduler=scheduler, add_watermarker=False, force_zeros_for_empty_prompt=zeros)
    else:
        pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=backbone.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_strength(system, encoded: dict, strengths: dict[str, float]) -> dict:
    """encoded with each named word moved from its initializer word by `strength` times what it
    learned: embeds = init + strength * (embeds - init). 1 is the word as learned, 0 the
    initializer word, above 1 amplified (ShapeWords' strength knob, on the word itself)."""
    scaled = dict(encoded)
    for name, strength in strengths.items():
        embeds = encoded[name].embeds                                         # [B, K, D]
        init = system.table.initializer_rows[name].to(embeds).reshape(1, 1, -1)
        scaled[name] = copy.copy(encoded[name])
        scaled[name].embeds = embeds + (strength - 1) * (embeds - init)     # 1: exactly as learned
    return scaled


@torch.no_grad()
def sample(system, prompts: list[str], batch: dict | None = None, steps: int = 20, guidance_scale: float = 5.0,
           seed: int = 0, height: int | None = None, width: int | None = None, encoded: dict | None = None):
    """Generate one image per prompt with the words encoded from `batch` (or given as `encoded`,
    word -> ConceptOutput, when each word comes from a different object).

    Returns (images [B, 3, H, W] in [0, 1], attention maps [B, C, h, w] averaged over the
    denoising steps, conditional half only).
    """
    backbone, store = system.backbone, system.store
    dtype = next(backbone.unet.parameters()).dtype
    pipe = pipeline(system)
    encoded = encoded if encoded is not None else system.encode(batch)
    text, selection, pooled = system.text_conditioning(prompts, encoded)
    negative, _, negative_pooled = system.text_conditioning([""] * len(prompts), {})
    extra = {}
    if backbone.is_sdxl:
        if pipe.config.force_zeros_for_empty_prompt:     # SDXL base's own choice for an empty negative prompt
            negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
        extra = {"pooled_prompt_embeds": pooled.to(dtype), "negative_pooled_prompt_embeds": negative_pooled.to(dtype)}
    size = system.latent_size * backbone.vae_scale_factor
    height, width = height or size, width or size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    maps = None
    if system.attention_concepts:
        factor = backbone.vae_scale_factor
        store.begin(text.to(dtype), selection, (height // factor, width // factor), accumulate=True)
    try:
        # A VAE kept in another dtype (SDXL's in fp32 under fp16) decodes here, in its own dtype.
        decode_here = backbone.vae.dtype != dtype
        images = pipe(prompt_embeds=text.to(dtype), negative_prompt_embeds=negative.to(dtype), **extra,
                      num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                      height=height, width=width, output_type="latent" if decode_here else "pt").images
        if decode_here:
            latents = images.to(backbone.vae.dtype) / backbone.vae.config.scaling_factor
            images = (backbone.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        if system.attention_concepts:
            maps = store.collect().cpu()
    finally:
        store.end()
    return images.float().cpu(), maps
