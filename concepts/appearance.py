"""Appearance `*a`: a head reads the masked object pixels; guided by the denoising loss inside
the mask (normalised by its area), so the word carries what the object looks like."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from concepts.base import Concept, ConceptConfig, ConceptOutput, ConvEncoder, OffsetHead, StepView
from losses import denoising_loss, offset_l2


@dataclass
class AppearanceConfig(ConceptConfig):
    token: str = field(default="*a", metadata={"help": "placeholder word for the appearance"})
    initializer: str = field(default="texture", metadata={"help": "vocabulary word the embedding starts from"})
    phrase: str = field(default="with the appearance of {token}", metadata={"help": "prompt clause"})
    encoder: str = field(default="cnn", metadata={"help": "cnn (small, trained) | pretrained (the frozen image encoder)"})

    def __post_init__(self):
        if self.encoder not in ("cnn", "pretrained"):
            raise ValueError(f"concepts.appearance.encoder: {self.encoder!r} is not 'cnn' or 'pretrained'")


@dataclass
class AppearanceLossConfig:
    masked_denoise_weight: float = field(default=1.0, metadata={"help": "denoising loss inside the object mask"})
    normalize: str = field(default="area", metadata={"help": "area (per object) | mean (over all pixels)"})
    offset_weight: float = field(default=1e-2, metadata={"help": "L2 penalty on the head's offset"})


def masked_pixels(batch: dict) -> torch.Tensor:
    """The object on a neutral grey background: [B, 3, H, W] in [-1, 1]."""
    return batch["image"].float() * batch["mask"].float()


class AppearanceConcept(Concept):
    name = "appearance"
    needs = ("mask",)

    @classmethod
    def uses_image_encoder(cls, config: AppearanceConfig) -> bool:
        return config.encoder == "pretrained"

    def __init__(self, config: AppearanceConfig, loss_config: AppearanceLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        if config.encoder == "pretrained":
            if image_encoder is None:
                raise ValueError("concepts.appearance.encoder is 'pretrained' but the model has no image encoder")
            self.image_encoder, in_dim = image_encoder, image_encoder.out_dim
        else:
            self.pixel_encoder = ConvEncoder(in_channels=3)
            in_dim = self.pixel_encoder.out_dim
        self.head = OffsetHead(in_dim, initializer_row, config.num_vectors, config.hidden_dim, config.scale,
                               config.train_rows)

    def encode(self, batch: dict) -> ConceptOutput:
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
