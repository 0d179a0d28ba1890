"""The learned words around a frozen backbone: encode objects, build prompts, compute losses,
sample with attention overlays. train.py drives it; generate.py and the tests use it directly."""
from __future__ import annotations

import copy
import random
import re
from types import SimpleNamespace

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from guided_concepts.backbone import Backbone
from guided_concepts.capture import AttentionStore, choose_layers, install_capture
from guided_concepts.concepts import CONCEPTS, StepView, check_requirements
from guided_concepts.losses import contrast_loss, denoising_loss, denoising_target, word_target_loss
from guided_concepts.objectdata.sampling import contrast_partners, partner_weights
from guided_concepts.tokens import (PlaceholderSpec, PlaceholderTable, encode_prompts, encode_prompts_with_pooled,
                                    placeholder_selection, tokenize)


def render_prompt(template: str, category: str, clauses: dict[str, str]) -> str:
    """Fill a template's slots: {category}; a concept's own slot ({shape}, {pose}, …) gets its
    clause, or nothing when the concept is inactive; {phrases} gets every other active clause.

    'a photo of a {category} {phrases}' -> 'a photo of a chair in the shape of *s with pose *p'
    A clause holding {category} (appearance's "{token} {category}") wraps the noun instead:
    -> 'a photo of a *a chair in the shape of *s'.
    """
    for name, clause in list(clauses.items()):      # "{token} {category}": the word goes on the noun
        if "{category}" in clause:
            category = clause.replace("{category}", category)
            clauses = {**clauses, name: ""}
    slots = {name: "" for name in CONCEPTS}
    slots.update(clauses)
    named = [n for n in CONCEPTS if "{" + n + "}" in template]
    phrases = " ".join(c for n, c in clauses.items() if c and n not in named)
    try:
        text = template.format(category=category, phrases=phrases, **slots)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt template {template!r}: unknown slot {err}; slots are {{category}}, "
                         f"{{phrases}}, " + ", ".join("{" + n + "}" for n in CONCEPTS)) from err
    text = " ".join(text.split())                        # an empty slot leaves no double space
    text = re.sub(r"\s+([,.;:])", r"\1", text)            # nor a space before punctuation
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)    # nor doubled commas
    return text.strip(" ,;:")


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors to `device`; lists (categories, names) stay as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def random_subsets(names: list[str], count: int, rng: random.Random) -> list[list[str]]:
    """Union sampling (Break-A-Scene): a random non-empty subset of `names` per sample, uniform
    over the 2^n - 1 subsets, so every word must also work alone."""
    n = len(names)
    out = []
    for _ in range(count):
        bits = rng.randrange(1, 2 ** n)
        out.append([name for i, name in enumerate(names) if bits >> i & 1])
    return out


class Heads(nn.ModuleDict):
    """The concepts' heads. Their forward is what accelerate/DDP wraps, so gradients of every
    head are averaged across GPUs."""

    def forward(self, batch: dict, names: list[str] | None = None) -> dict:
        return {n: self[n].encode(batch) for n in (names or list(self.keys()))}

    def set_noise_generator(self, generator: torch.Generator | None):
        """Stochastic heads (the shape set encoder) draw from `generator`, e.g. the run's own
        noise stream, so a resumed run reproduces an uninterrupted one."""
        for concept in self.values():
            if hasattr(concept, "noise_generator"):
                concept.noise_generator = generator


class GuidedConcepts(nn.Module):
    """Heads of the active concepts (the only trainable part) plus the frozen backbone."""

    def __init__(self, backbone: Backbone, concept_configs: dict, loss_configs: dict, tokens: list[str],
                 attention_resolutions=None, latent_size: int | None = None):
        """latent_size: the training latent size (data resolution / VAE factor); the attention
        layers are chosen for it. Default: the UNet's native sample size."""
        super().__init__()
        self.backbone = backbone
        self.tokens = list(tokens)
        check_requirements(self.tokens, concept_configs, loss_configs)
        specs = [PlaceholderSpec(n, concept_configs[n].token, concept_configs[n].initializer,
                                 concept_configs[n].num_vectors) for n in self.tokens]
        self.table = PlaceholderTable(backbone.text_side, specs)
        self.concepts = Heads({
            n: CONCEPTS[n].concept(concept_configs[n], loss_configs[n], self.table.initializer_rows[n],
                              backbone.image_encoder)
            for n in self.tokens})
        self.attention_concepts = [n for n in self.tokens if self.concepts[n].attention]
        self.latent_size = latent_size or backbone.unet.config.sample_size
        for n in self.tokens:       # a bad clause or template slot fails here, before training
            self.clause(n)
        self.attention_layers = choose_layers(backbone.unet, self.latent_size, attention_resolutions)
        # Capture processors stay installed (stock fused attention everywhere else): gradient
        # checkpointing re-runs them in backward. They record only while a store is begun.
        self.store = AttentionStore()
        self.latent_cache: dict | None = None       # {} turns VAE latent caching on (data.cache_latents)
        self.word_targets: dict = {}                 # concept -> object name -> [K, D] (train.word_targets)
        install_capture(backbone.unet, self.store, self.attention_layers if self.attention_concepts else [])

    # -- parameters ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a run saves: the heads' parameters (frozen encoders excluded)."""
        return {k: v for k, v in self.concepts.state_dict().items() if ".image_encoder." not in k}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str | None = None):
        """Load heads saved by trainable_state. A checkpoint of other heads (another config or
        model) is a ValueError naming the first tensor that differs; `source` (e.g. "checkpoint X
        trained on model 'a', this run's model is 'b'") is added to the message in brackets."""
        where = f" ({source})" if source else ""
        own = self.concepts.state_dict()
        for key, value in state.items():        # torch raises a many-line RuntimeError for these
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"checkpoint heads do not fit this model: {key} has shape {list(value.shape)} "
                                 f"in the checkpoint, {list(own[key].shape)} here{where}")
        missing = [k for k in own if k not in state and ".image_encoder." not in k]     # frozen: not saved
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            def some(keys):
                return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            parts = ([f"this model has {some(missing)}, which the checkpoint lacks"] if missing else []) + \
                    ([f"the checkpoint has {some(unexpected)}, which this model lacks"] if unexpected else [])
            raise ValueError(f"checkpoint heads do not fit this model: {'; '.join(parts)}{where}")
        self.concepts.load_state_dict(state, strict=False)

    # -- text side -------------------------------------------------------------------------------
    def clause(self, name: str) -> str:
        config = self.concepts[name].config
        return config.phrase.format(token=config.token, category="{category}")   # render_prompt fills it

    def prompts_for(self, batch: dict, templates: list[str], active: list[str], rng: random.Random,
                    by_category: dict | None = None) -> list[str]:
        """The same active words in every sample's prompt."""
        return self.make_prompts(batch, templates, rng, union=False, by_category=by_category, active=active)[0]

    def make_prompts(self, batch: dict, templates: list[str], rng: random.Random, union: bool = False,
                     by_category: dict | None = None, active: list[str] | None = None):
        """-> prompts [B], present {concept: bool [B]} (which words each prompt uses).

        union: each sample uses a random non-empty subset of the active words.
        by_category: category -> templates, overriding `templates` for that category.
        """
        active = list(active or self.tokens)
        categories = list(batch["category"])
        subsets = random_subsets(active, len(categories), rng) if union else [active] * len(categories)
        prompts = []
        for category, subset in zip(categories, subsets):
            choices = (by_category or {}).get(category) or templates
            prompts.append(render_prompt(rng.choice(choices), category, {n: self.clause(n) for n in subset}))
        present = {n: torch.tensor([n in s for s in subsets]) for n in self.tokens}
        return prompts, present

    def encode(self, batch: dict, active: list[str] | None = None) -> dict:
        return self.concepts(batch, active)

    def with_strength(self, outs: dict, strengths: dict[str, float]) -> dict:
        """outs with each named word moved from its initializer word by `strength` times what it
        learned: embeds = init + strength * (embeds - init). 1 is the word as learned, 0 the
        initializer word, above 1 amplified (ShapeWords' strength knob, on the word itself)."""
        scaled = dict(outs)
        for name, strength in strengths.items():
            embeds = outs[name].embeds                                     # [B, K, D]
            init = self.table.initializer_rows[name].to(embeds).reshape(1, 1, -1)
            scaled[name] = copy.copy(outs[name])
            scaled[name].embeds = embeds + (strength - 1) * (embeds - init)     # 1: exactly as learned
        return scaled

    def text_embeddings(self, prompts: list[str], outs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text embeddings [B, L, D] and placeholder selection [B, L, C_attention]."""
        return self.text_conditioning(prompts, outs)[:2]

    def text_conditioning(self, prompts: list[str], outs: dict):
        """-> text embeddings [B, L, D], placeholder selection [B, L, C_attention], and SDXL's pooled
        embedding [B, P] (None for SD 1.x/2.x)."""
        ids = tokenize(self.table, prompts)
        words = {n: o.embeds for n, o in outs.items()}
        if self.backbone.is_sdxl:
            embeds, pooled = encode_prompts_with_pooled(self.table, ids, words)
        else:
            embeds, pooled = encode_prompts(self.table, ids, words), None
        return embeds, placeholder_selection(self.table, ids[0], self.attention_concepts), pooled

    def added_conditioning(self, pooled: torch.Tensor | None, batch: dict | None, size: int) -> dict | None:
        """SDXL's extra UNet inputs: the pooled text embedding and the time ids [B, 6] (the view's
        original size, its crop's top-left corner, the target size; from the data, as diffusers'
        SDXL training does; a batch without them counts as uncropped at `size`). None for SD."""
        if not self.backbone.is_sdxl:
            return None
        if pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding: use text_conditioning()")
        count = pooled.shape[0]
        target = torch.tensor([size, size], dtype=torch.float32).expand(count, 2)
        original = batch["original_size"].float() if batch is not None and "original_size" in batch else target
        corner = batch["crop_top_left"].float() if batch is not None and "crop_top_left" in batch else torch.zeros(count, 2)
        time_ids = torch.cat([original, corner, target], dim=-1).to(pooled.device, pooled.dtype)     # [B, 6]
        return {"text_embeds": pooled, "time_ids": time_ids}

    # -- one training step -----------------------------------------------------------------------
    def training_losses(self, batch: dict, prompts: list[str], generator: torch.Generator | None = None,
                        present: dict[str, torch.Tensor] | None = None, outs: dict | None = None,
                        timesteps: int | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        """All loss terms of one step: name -> (weight, per-sample values [B]). The caller reduces.

        present: concept -> bool [B], which prompts use the word (union sampling); a word's
        guidance losses count only where its prompt uses it.
        outs: the heads' outputs when the caller ran them (through DDP); else they run here.
        timesteps: one fixed timestep for every sample (evaluation); default: uniformly random.
        """
        bb = self.backbone
        device = next(bb.unet.parameters()).device
        with torch.no_grad():
            latents = self.encode_latents(batch, generator)                        # [B, 4, h, w]
        # Random draws on the generator's device (CPU by default), then moved: works on any device.
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, bb.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        if timesteps is not None:
            t = torch.full_like(t, timesteps)
        noisy = bb.scheduler.add_noise(latents, noise, t)

        outs = outs if outs is not None else self.concepts(batch)
        text, selection, pooled = self.text_conditioning(prompts, outs)
        added = self.added_conditioning(pooled, batch, batch["image"].shape[-1])
        capture = any(self.concepts[n].trains_attention() for n in self.attention_concepts)
        pred, maps = self.unet_with_attention(noisy, t, text, selection, capture, added)
        attention = {n: maps[:, i] for i, n in enumerate(self.attention_concepts)} if maps is not None else None
        target = denoising_target(bb.scheduler, latents, noise, t)

        losses = {"denoise": (1.0, denoising_loss(pred, target))}
        same_object = same_camera = None
        if "object_index" in batch and "camera" in batch:
            same_object, same_camera = partner_weights(batch["object_index"], batch["camera"],
                                                       batch.get("canonical_camera", batch["has_camera"]))
        view = StepView(timesteps=t, attention=attention, pred=pred, target=target,
                        same_object=same_object, same_camera=same_camera)
        for n, out in outs.items():
            used = present[n].to(device).float() if present is not None else None
            for name, (weight, value) in self.concepts[n].guidance_losses(out, batch, view).items():
                losses[f"{n}/{name}"] = (weight, value * used if used is not None else value)
        losses.update(self.contrast_losses(batch, prompts, outs, noisy, t, target, losses["denoise"][1], present, generator))
        losses.update(self.target_losses(batch, outs))
        return losses

    def target_losses(self, batch: dict, outs: dict) -> dict:
        """Word targets (a concept's loss config `target_weight` > 0): each word against its
        object's target word; objects without one (held out, new) contribute 0."""
        losses = {}
        for n, out in outs.items():
            weight = getattr(self.concepts[n].loss_config, "target_weight", 0.0)
            if weight <= 0 or n not in self.word_targets or "object_name" not in batch:
                continue
            words = self.word_targets[n]
            targets = torch.stack([words.get(o, torch.zeros_like(out.embeds[0])).to(out.embeds.device)
                                   for o in batch["object_name"]])                     # [B, K, D]
            valid = torch.tensor([o in words for o in batch["object_name"]])
            losses[f"{n}/word_target"] = (weight, word_target_loss(out.embeds, targets, valid))
        return losses

    def contrast_losses(self, batch, prompts, outs, noisy, t, target, own, present, generator) -> dict:
        """Word contrast (a concept's loss config `contrast_weight` > 0): one such word per step,
        drawn at random, is replaced in every prompt by another object's (objectdata's
        contrast_partners), the UNet runs again on the same noisy latents, and the word pays when
        its own object's image is not explained better than with the other's. One extra UNet pass."""
        weights = {n: getattr(self.concepts[n].loss_config, "contrast_weight", 0.0) for n in outs}
        names = [n for n, w in weights.items() if w > 0]
        if not names or "object_index" not in batch:
            return {}
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        partners = contrast_partners(batch["object_index"], batch["camera"],
                                     batch.get("canonical_camera", batch["has_camera"]), generator)
        swapped = {n: SimpleNamespace(embeds=o.embeds[partners.to(o.embeds.device)] if n == name else o.embeds)
                   for n, o in outs.items()}
        text, selection, pooled = self.text_conditioning(prompts, swapped)
        added = self.added_conditioning(pooled, batch, batch["image"].shape[-1])
        pred, _ = self.unet_with_attention(noisy, t, text, selection, capture=False, added=added)
        value = contrast_loss(own, denoising_loss(pred, target), self.concepts[name].loss_config.contrast_margin)
        valid = (partners.to(value.device) != torch.arange(len(value), device=value.device)).float()
        if present is not None:
            valid = valid * present[name].to(value.device).float()
        # Logged for every contrast word (0 on steps it was not drawn), so log lines keep their keys.
        return {f"{n}/contrast": (weights[n] * len(names), value * valid if n == name else torch.zeros_like(value))
                for n in names}

    def encode_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of the batch's images, scaled.  -> [B, 4, h, w] fp32

        With `latent_cache` (a dict) on, each (object, view, flip)'s latent mean/std is computed
        once; the sample is drawn from the same generator, so a cached run equals an uncached one.
        """
        vae, device = self.backbone.vae, next(self.backbone.unet.parameters()).device
        images = batch["image"].to(device, vae.dtype)
        if self.latent_cache is None or "view_index" not in batch:
            dist = vae.encode(images).latent_dist
        else:
            keys = list(zip(batch["object_index"].tolist(), batch["view_index"].tolist(), batch["flipped"].tolist()))
            missing = [i for i, k in enumerate(keys) if k not in self.latent_cache]
            if missing:
                fresh = vae.encode(images[missing]).latent_dist
                for j, i in enumerate(missing):      # clones: views would keep the whole VAE output alive
                    self.latent_cache[keys[i]] = (fresh.mean[j].clone(), fresh.std[j].clone())
            mean = torch.stack([self.latent_cache[k][0] for k in keys])
            dist = SimpleNamespace(mean=mean, std=torch.stack([self.latent_cache[k][1] for k in keys]))
        noise = randn_tensor(dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
        return (dist.mean + dist.std * noise).float() * vae.config.scaling_factor

    def unet_with_attention(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, selection: torch.Tensor,
                            capture: bool = True, added: dict | None = None):
        """One UNet call -> (prediction [B, 4, h, w] in fp32, maps [B, C, h', w'] or None).
        added: SDXL's pooled embedding and time ids (added_conditioning)."""
        unet = self.backbone.unet
        dtype = next(unet.parameters()).dtype
        if self.backbone.is_sdxl and added is None:
            raise ValueError("an SDXL UNet needs added conditioning (pooled text embedding, time ids): "
                             "pass added=system.added_conditioning(...)")
        kwargs = {"added_cond_kwargs": {k: v.to(dtype) for k, v in added.items()}} if added is not None else {}
        if not self.attention_concepts or not capture:
            return unet(noisy.to(dtype), t, text.to(dtype), **kwargs).sample.float(), None
        self.store.begin(text.to(dtype), selection, tuple(noisy.shape[-2:]), layout_known=True)
        pred = unet(noisy.to(dtype), t, text.to(dtype), **kwargs).sample.float()
        maps = self.store.collect()
        self.store.recording = False     # prompts stay set for checkpoint recomputation
        return pred, maps

    # -- sampling --------------------------------------------------------------------------------
    def pipeline(self):
        """The backbone as a stock diffusers pipeline (SD or SDXL) with a DDIM scheduler."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        bb = self.backbone
        scheduler = DDIMScheduler.from_config(bb.scheduler.config)
        (tokenizer, text_encoder), *second = bb.text_side
        if bb.is_sdxl:
            pipe = StableDiffusionXLPipeline(vae=bb.vae, text_encoder=text_encoder, text_encoder_2=second[0][1],
                                             tokenizer=tokenizer, tokenizer_2=second[0][0], unet=bb.unet,
                                             scheduler=scheduler, add_watermarker=False,
                                             force_zeros_for_empty_prompt=bb.pipeline_setting("force_zeros_for_empty_prompt", True))
        else:
            pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=bb.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, prompts: list[str], batch: dict | None = None, steps: int = 20, guidance_scale: float = 5.0,
               seed: int = 0, height: int | None = None, width: int | None = None, outs: dict | None = None):
        """Generate one image per prompt with the words encoded from `batch` (or given as `outs`,
        concept -> ConceptOutput, when each word comes from a different object).

        Returns (images [B, 3, H, W] in [0, 1], attention maps [B, C, h, w] averaged over the
        denoising steps, conditional half only).
        """
        bb = self.backbone
        dtype = next(bb.unet.parameters()).dtype
        pipe = self.pipeline()
        outs = outs if outs is not None else self.encode(batch)
        text, selection, pooled = self.text_conditioning(prompts, outs)
        negative, _, negative_pooled = self.text_conditioning([""] * len(prompts), {})
        extra = {}
        if bb.is_sdxl:
            if pipe.config.force_zeros_for_empty_prompt:     # SDXL base's own choice for an empty negative prompt
                negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
            extra = {"pooled_prompt_embeds": pooled.to(dtype), "negative_pooled_prompt_embeds": negative_pooled.to(dtype)}
        size = self.latent_size * bb.vae_scale_factor
        height, width = height or size, width or size
        generator = torch.Generator(device="cpu").manual_seed(seed)
        maps = None
        if self.attention_concepts:
            self.store.begin(text.to(dtype), selection, (height // bb.vae_scale_factor, width // bb.vae_scale_factor),
                             accumulate=True)
        try:
            # A VAE kept in another dtype (SDXL's in fp32 under fp16) decodes here, in its own dtype.
            decode_here = bb.vae.dtype != dtype
            images = pipe(prompt_embeds=text.to(dtype), negative_prompt_embeds=negative.to(dtype), **extra,
                          num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                          height=height, width=width, output_type="latent" if decode_here else "pt").images
            if decode_here:
                latents = images.to(bb.vae.dtype) / bb.vae.config.scaling_factor
                images = (bb.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
            if self.attention_concepts:
                maps = self.store.collect().cpu()
        finally:
            self.store.end()
        return images.float().cpu(), maps
