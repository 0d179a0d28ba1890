"""Appearance `*a`: a head reads the masked object pixels; guided by the denoising loss inside
the mask (normalised by its area), so the word carries what the object looks like."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from guided_concepts.concepts.base import Concept, ConceptConfig, ConceptOutput, ConvEncoder, OffsetHead, StepView, Requirements, WordLossConfig
from guided_concepts.choices import check_choices
from guided_concepts.losses import denoising_loss, offset_l2


APPEARANCE_ENCODERS = ("cnn", "pretrained", "colour")


@dataclass
class AppearanceConfig(ConceptConfig):
    token: str = field(default="*a", metadata={"help": "placeholder word for the appearance"})
    initializer: str = field(default="texture", metadata={"help": "vocabulary word the embedding starts from"})
    # Before the noun, where captions put a colour ("a red chair"): trained as a trailing "with the
    # appearance of *a", ToyWorld 2's word read back its colour in 0.45 of samples, on the noun 1.00.
    phrase: str = field(default="{token} {category}", metadata={"help": "prompt clause; {category}: on the noun ('a *a chair')"})
    encoder: Literal[APPEARANCE_ENCODERS] = field(default="colour", metadata={"help": f"one of {APPEARANCE_ENCODERS}: cnn (small, trained, on the masked pixels) | pretrained (the frozen image encoder) | colour (colour statistics inside the mask: no silhouette, so shape has one route only)"})


    def __post_init__(self):
        check_choices(self)


@dataclass
class AppearanceLossConfig(WordLossConfig):
    masked_denoise_weight: float = field(default=1.0, metadata={"help": "denoising loss inside the object mask"})
    normalize: str = field(default="area", metadata={"help": "area (per object) | mean (over all pixels)"})


class ColourStatistics(torch.nn.Module):
    """Colour inside the mask, with no trace of its outline: per channel the mean, standard
    deviation and quartiles of the object's pixels.  [B, 3, H, W], [B, 1, H, W] -> [B, 15]"""
    out_dim = 15

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pixels = image.float().flatten(2)                                        # [B, 3, N]
        inside = mask.float().flatten(2) > 0.5                                   # [B, 1, N]
        count = inside.sum(-1).clamp(min=1)                                      # [B, 1]
        mean = (pixels * inside).sum(-1) / count                                 # [B, 3]
        std = (((pixels - mean[..., None]) ** 2 * inside).sum(-1) / count).sqrt()
        # quartiles over the object's pixels only: outside pixels are set to NaN and ignored
        quartiles = torch.nanquantile(pixels.masked_fill(~inside, float("nan")),
                                      torch.tensor([0.25, 0.5, 0.75], device=image.device), dim=-1)  # [3q, B, 3]
        quartiles = torch.nan_to_num(quartiles).permute(1, 0, 2).flatten(1)     # [B, 9]
        return torch.cat([mean, std, quartiles], dim=1)


def masked_pixels(batch: dict) -> torch.Tensor:
    """The object on a neutral grey background: [B, 3, H, W] in [-1, 1]."""
    return batch["image"].float() * batch["mask"].float()


class AppearanceConcept(Concept):
    name = "appearance"

    @classmethod
    def requirements(cls, config: AppearanceConfig, at_generation: bool = False, options: dict | None = None) -> Requirements:
        return Requirements(data=("mask",), image_encoder=config.encoder == "pretrained")

    def __init__(self, config: AppearanceConfig, loss_config: AppearanceLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        if config.encoder == "pretrained":
            if image_encoder is None:
                raise ValueError("concepts.appearance.encoder is 'pretrained' but the model has no image encoder")
            self.image_encoder, in_dim = image_encoder, image_encoder.out_dim
        elif config.encoder == "colour":
            self.colour_statistics = ColourStatistics()
            in_dim = ColourStatistics.out_dim
        else:
            self.pixel_encoder = ConvEncoder(in_channels=3)
            in_dim = self.pixel_encoder.out_dim
        self.head = OffsetHead(in_dim, initializer_row, config.num_vectors, config.hidden_dim, config.scale,
                               config.train_rows, config.fixed_norm)

    def encode(self, batch: dict) -> ConceptOutput:
        if self.config.encoder == "colour":
            return self.head(self.colour_statistics(batch["image"], batch["mask"]))
        pixels = masked_pixels(batch)
        encoder = self.image_encoder if self.config.encoder == "pretrained" else self.pixel_encoder
        return self.head(encoder(pixels))

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: StepView):
        lc = self.loss_config
        return {
            "offset_l2": (lc.offset_weight, offset_l2(out.offset)),
            "masked_denoise": (lc.masked_denoise_weight,
                               denoising_loss(step.pred, step.target, batch["mask"], lc.normalize)),
        }
