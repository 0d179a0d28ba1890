"""Shape `*s`: a head reads the object mask (and optionally the RGB view through a frozen image
encoder); its cross-attention map is pulled toward the mask of the view being denoised."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from concepts.base import Concept, ConceptConfig, ConceptOutput, ConvEncoder, OffsetHead, StepView, in_timestep_range
from losses import MASK_ATTENTION_VARIANTS, consistency_loss, mask_attention_loss, offset_l2


@dataclass
class ShapeConfig(ConceptConfig):
    token: str = field(default="*s", metadata={"help": "placeholder word for the shape"})
    initializer: str = field(default="object", metadata={"help": "vocabulary word the embedding starts from"})
    phrase: str = field(default="in the shape of {token}", metadata={"help": "prompt clause"})
    use_image: bool = field(default=False, metadata={"help": "also feed the RGB view through the frozen image encoder"})
    mask_width: int = field(default=16, metadata={"help": "channels of the mask CNN's first layer"})


@dataclass
class ShapeLossConfig:
    mask_weight: float = field(default=0.1, metadata={"help": "mask cross-attention loss weight (seeds: 0.1)"})
    mask_variant: str = field(default="mse_maxnorm", metadata={"help": f"one of {MASK_ATTENTION_VARIANTS}"})
    mask_t_range: tuple[int, int] = field(default=(0, 600), metadata={"help": "timesteps [lo, hi) where the mask loss applies; at high noise the object is not visible"})
    offset_weight: float = field(default=1e-2, metadata={"help": "L2 penalty on the head's offset"})
    view_consistency_weight: float = field(default=0.1, metadata={"help": "pull *s of one object's views together (needs multi-view batches)"})

    def __post_init__(self):
        if self.mask_variant not in MASK_ATTENTION_VARIANTS:
            raise ValueError(f"losses.shape.mask_variant: {self.mask_variant!r} is not one of {MASK_ATTENTION_VARIANTS}")
        self.mask_t_range = tuple(self.mask_t_range)


class ShapeConcept(Concept):
    name = "shape"
    needs = ("mask",)
    attention = True

    def __init__(self, config: ShapeConfig, loss_config: ShapeLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        self.mask_encoder = ConvEncoder(in_channels=1, width=config.mask_width)
        in_dim = self.mask_encoder.out_dim
        self.image_encoder = image_encoder if config.use_image else None
        if config.use_image:
            if image_encoder is None:
                raise ValueError("concepts.shape.use_image is true but the model has no image encoder")
            in_dim += image_encoder.out_dim
        self.head = OffsetHead(in_dim, initializer_row, config.num_vectors, config.hidden_dim, config.scale,
                               config.train_rows)

    def encode(self, batch: dict) -> ConceptOutput:
        features = self.mask_encoder(batch["mask"])                       # [B, F]
        if self.image_encoder is not None:
            features = torch.cat([features, self.image_encoder(batch["image"])], dim=1)
        return self.head(features)

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: StepView):
        lc = self.loss_config
        losses = {"offset_l2": (lc.offset_weight, offset_l2(out.offset))}
        if lc.mask_weight > 0 and step.attention is not None:
            per_sample = mask_attention_loss(step.attention[self.name], batch["mask"], lc.mask_variant)
            losses["mask_attention"] = (lc.mask_weight, per_sample * in_timestep_range(step.timesteps, lc.mask_t_range))
        if lc.view_consistency_weight > 0 and step.same_object is not None:
            losses["view_consistency"] = (lc.view_consistency_weight, consistency_loss(out.offset, step.same_object))
        return losses
