"""The learned words around a frozen backbone: encode objects, build prompts, compute losses,
sample with attention overlays. train.py drives it; generate.py and the tests use it directly."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from backbone import Backbone
from capture import AttentionStore, capture_attention, choose_layers
from concepts import CONCEPTS, StepView
from losses import denoising_loss, denoising_target
from tokens import PlaceholderSpec, PlaceholderTable, encode_prompts, placeholder_selection, tokenize


def render_prompt(template: str, category: str, phrases: list[str]) -> str:
    """'a photo of a {category} {phrases}' -> 'a photo of a chair in the shape of *s with pose *p'."""
    text = template.format(category=category, phrases=" ".join(phrases))
    return " ".join(text.split())   # an empty slot leaves no double space


class GuidedConcepts(nn.Module):
    """Heads of the active concepts (the only trainable part) plus the frozen backbone."""

    def __init__(self, backbone: Backbone, concept_configs: dict, loss_configs: dict, tokens: list[str],
                 attention_resolutions=None):
        super().__init__()
        self.backbone = backbone
        self.tokens = list(tokens)
        specs = [PlaceholderSpec(n, concept_configs[n].token, concept_configs[n].initializer,
                                 concept_configs[n].num_vectors) for n in self.tokens]
        self.table = PlaceholderTable(backbone.text_side, specs)
        self.concepts = nn.ModuleDict({
            n: CONCEPTS[n][0](concept_configs[n], loss_configs[n], self.table.initializer_rows[n],
                              backbone.image_encoder)
            for n in self.tokens})
        self.attention_concepts = [n for n in self.tokens if self.concepts[n].attention]
        self.latent_size = backbone.unet.config.sample_size
        self.attention_layers = choose_layers(backbone.unet, self.latent_size, attention_resolutions)

    # -- parameters ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a run saves: the heads' parameters (frozen encoders excluded)."""
        return {k: v for k, v in self.concepts.state_dict().items() if ".image_encoder." not in k}

    def load_trainable_state(self, state: dict[str, torch.Tensor]):
        missing, unexpected = self.concepts.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".image_encoder." not in k]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the concepts: missing {missing}, unexpected {unexpected}")

    # -- text side -------------------------------------------------------------------------------
    def prompts_for(self, batch: dict, templates: list[str], active: list[str], rng: random.Random) -> list[str]:
        phrases = [self.concepts[n].config.phrase.format(token=self.concepts[n].config.token) for n in active]
        return [render_prompt(rng.choice(templates), c, phrases) for c in batch["category"]]

    def encode(self, batch: dict, active: list[str] | None = None) -> dict:
        return {n: self.concepts[n].encode(batch) for n in (active or self.tokens)}

    def text_embeddings(self, prompts: list[str], outs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text embeddings [B, L, D] and placeholder selection [B, L, C_attention]."""
        ids = tokenize(self.table, prompts)
        embeds = encode_prompts(self.table, ids, {n: o.embeds for n, o in outs.items()})
        return embeds, placeholder_selection(self.table, ids[0], self.attention_concepts)

    # -- one training step -----------------------------------------------------------------------
    def training_losses(self, batch: dict, prompts: list[str], generator: torch.Generator | None = None,
                        loss_weights: dict | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        """All loss terms of one step: name -> (weight, per-sample values [B]). The caller reduces."""
        bb = self.backbone
        device = next(bb.unet.parameters()).device
        dtype = next(bb.unet.parameters()).dtype
        with torch.no_grad():
            latents = bb.vae.encode(batch["image"].to(device, bb.vae.dtype)).latent_dist.sample(generator)
            latents = latents * bb.vae.config.scaling_factor                     # [B, 4, h, w]
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        t = torch.randint(0, bb.scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator, device=device)
        noisy = bb.scheduler.add_noise(latents, noise, t)

        outs = self.encode(batch)
        text, selection = self.text_embeddings(prompts, outs)
        store = AttentionStore(tuple(latents.shape[-2:]))
        attention = None
        if self.attention_concepts:
            store.set_prompts(text, selection)
            with capture_attention(bb.unet, store, self.attention_layers):
                pred = bb.unet(noisy.to(dtype), t, text.to(dtype)).sample
            maps = store.collect()                                               # [B, C, h, w]
            attention = {n: maps[:, i] for i, n in enumerate(self.attention_concepts)}
        else:
            pred = bb.unet(noisy.to(dtype), t, text.to(dtype)).sample
        target = denoising_target(bb.scheduler, latents, noise, t)

        losses = {"denoise": (1.0, denoising_loss(pred, target))}
        view = StepView(timesteps=t, attention=attention, pred=pred, target=target)
        for n, out in outs.items():
            for name, (weight, value) in self.concepts[n].guidance_losses(out, batch, view).items():
                losses[f"{n}/{name}"] = (weight, value)
        return losses

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], batch: dict | None = None, steps: int = 20, guidance_scale: float = 5.0,
               seed: int = 0, height: int | None = None, width: int | None = None, outs: dict | None = None):
        """Generate one image per prompt with the words encoded from `batch` (or given as `outs`,
        concept -> ConceptOutput, when each word comes from a different object).

        Returns (images [B, 3, H, W] in [0, 1], attention maps [B, C, h, w] averaged over the
        denoising steps, conditional half only).
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        bb = self.backbone
        device = next(bb.unet.parameters()).device
        dtype = next(bb.unet.parameters()).dtype
        tokenizer, text_encoder = bb.text_side[0]
        pipe = StableDiffusionPipeline(
            vae=bb.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=bb.unet,
            scheduler=DDIMScheduler.from_config(bb.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        outs = outs if outs is not None else self.encode(batch)
        text, selection = self.text_embeddings(prompts, outs)
        negative, _ = self.text_embeddings([""] * len(prompts), {})
        size = bb.unet.config.sample_size * bb.vae_scale_factor
        height, width = height or size, width or size
        store = AttentionStore((height // bb.vae_scale_factor, width // bb.vae_scale_factor))
        store.accumulate = True
        store.set_prompts(text.to(dtype), selection)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with capture_attention(bb.unet, store, self.attention_layers if self.attention_concepts else []):
            images = pipe(prompt_embeds=text.to(dtype), negative_prompt_embeds=negative.to(dtype),
                          num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                          height=height, width=width, output_type="pt").images
        maps = store.collect() if self.attention_concepts else None
        return images.float().cpu(), (maps.cpu() if maps is not None else None)
