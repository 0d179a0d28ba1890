"""The hub: the learned words' heads around a frozen backbone. It holds the heads, the placeholder
table and the attention capture, and turns prompts plus words into UNet conditioning. The
objective is `objective.training_losses`, sampling is `sampling.sample`, prompt text is
`prompts`; `build_system` makes one from a config for train, generate, tune and bench."""
from __future__ import annotations

import torch
from torch import nn

from guided_concepts.backbone import Backbone, load_backbone
from guided_concepts.backbone.adapters import AdapterConfig, UNetAdapters
from guided_concepts.capture import AttentionStore, choose_layers, install_capture
from guided_concepts.concepts import CONCEPTS, check_requirements
from guided_concepts.prompts import clause_of
from guided_concepts.tokens import (PlaceholderSpec, PlaceholderTable, encode_prompts, encode_prompts_with_pooled,
                                    placeholder_selection, tokenize)


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors to `device`; lists (categories, names) stay as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    """Heads of the active words (the only trainable part) plus the frozen backbone.

    adapters: the config of the run's UNet adapters (E4T domain tuning); built after the heads,
    so a run draws the same initial heads and adapters whoever builds it.
    word_targets: word -> object name -> target word [K, D] (train.word_targets), or empty.
    """

    def __init__(self, backbone: Backbone, concept_configs: dict, loss_configs: dict, tokens: list[str],
                 attention_resolutions=None, latent_size: int | None = None, adapters: AdapterConfig | None = None,
                 word_targets: dict | None = None):
        """latent_size: the training latent size (data resolution / VAE factor); the attention
        layers are chosen for it. Default: the UNet's native sample size."""
        super().__init__()
        self.backbone = backbone
        self.tokens = list(tokens)
        check_requirements(self.tokens, concept_configs, loss_configs)
        specs = [PlaceholderSpec(n, concept_configs[n].token, concept_configs[n].initializer,
                                 concept_configs[n].num_vectors) for n in self.tokens]
        self.table = PlaceholderTable(backbone.text_side, specs)
        self.heads = Heads({
            n: CONCEPTS[n].concept(concept_configs[n], loss_configs[n], self.table.initializer_rows[n],
                                   backbone.image_encoder)
            for n in self.tokens})
        self.attention_concepts = [n for n in self.tokens if self.heads[n].attention]
        self.latent_size = latent_size or backbone.unet.config.sample_size
        # word -> its clause in prompts; a bad clause fails here, before training.
        self.clauses = {n: clause_of(self.heads[n].config) for n in self.tokens}
        self.attention_layers = choose_layers(backbone.unet, self.latent_size, attention_resolutions)
        # Capture processors stay installed (stock fused attention everywhere else): gradient
        # checkpointing re-runs them in backward. They record only while a store is begun.
        self.store = AttentionStore()
        install_capture(backbone.unet, self.store, self.attention_layers if self.attention_concepts else [])
        self.adapters = UNetAdapters(backbone.unet, adapters) if adapters is not None and adapters.kind != "none" else None
        self.word_targets = word_targets or {}

    # -- parameters ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a run saves: the heads' parameters (frozen encoders excluded)."""
        return {k: v for k, v in self.heads.state_dict().items() if ".image_encoder." not in k}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str | None = None):
        """Load heads saved by trainable_state. A checkpoint of other heads (another config or
        model) is a ValueError naming the first tensor that differs; `source` (e.g. "checkpoint X
        trained on model 'a', this run's model is 'b'") is added to the message in brackets."""
        where = f" ({source})" if source else ""
        own = self.heads.state_dict()
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
        self.heads.load_state_dict(state, strict=False)

    # -- words into conditioning -----------------------------------------------------------------
    def encode(self, batch: dict, active: list[str] | None = None) -> dict:
        """word -> ConceptOutput (its embedding [B, K, D] and what its losses need)."""
        return self.heads(batch, active)

    def text_conditioning(self, prompts: list[str], encoded: dict):
        """-> text embeddings [B, L, D], placeholder selection [B, L, C_attention], and SDXL's pooled
        embedding [B, P] (None for SD 1.x/2.x). encoded: word -> ConceptOutput."""
        ids = tokenize(self.table, prompts)
        words = {n: o.embeds for n, o in encoded.items()}
        if self.backbone.is_sdxl:
            embeds, pooled = encode_prompts_with_pooled(self.table, ids, words)
        else:
            embeds, pooled = encode_prompts(self.table, ids, words), None
        return embeds, placeholder_selection(self.table, ids[0], self.attention_concepts), pooled

    def unet_with_attention(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, selection: torch.Tensor,
                            capture: bool = True, added: dict | None = None):
        """One UNet call -> (prediction [B, 4, h, w] in fp32, maps [B, C, h', w'] or None).
        added: SDXL's pooled embedding and time ids (Backbone.added_conditioning)."""
        unet = self.backbone.unet
        dtype = next(unet.parameters()).dtype
        if self.backbone.is_sdxl and added is None:
            raise ValueError("an SDXL UNet needs added conditioning (pooled text embedding, time ids): "
                             "pass added=backbone.added_conditioning(...)")
        kwargs = {"added_cond_kwargs": {k: v.to(dtype) for k, v in added.items()}} if added is not None else {}
        if not self.attention_concepts or not capture:
            return unet(noisy.to(dtype), t, text.to(dtype), **kwargs).sample.float(), None
        self.store.begin(text.to(dtype), selection, tuple(noisy.shape[-2:]), layout_known=True)
        pred = unet(noisy.to(dtype), t, text.to(dtype), **kwargs).sample.float()
        maps = self.store.collect()
        self.store.recording = False     # prompts stay set for checkpoint recomputation
        return pred, maps


def load_backbone_for(cfg) -> Backbone:
    """The frozen backbone a config names, with the image encoder when an active word reads pixels."""
    needs_pixels = any(CONCEPTS[n].concept.requirements(cfg.concepts[n]).image_encoder for n in cfg.tokens)
    return load_backbone(cfg.model.name, cfg.model.image_encoder, needs_pixels, cfg.model.revision)


def build_system(cfg, backbone: Backbone, word_targets: dict | None = None) -> GuidedConcepts:
    """The system a config describes, on a loaded backbone (train, generate, tune and bench)."""
    return GuidedConcepts(backbone, cfg.concepts, cfg.losses, cfg.tokens, cfg.attention.resolutions,
                          latent_size=cfg.data.resolution // backbone.vae_scale_factor, adapters=cfg.adapters,
                          word_targets=word_targets)
