"""Style `*t`: a head reads global statistics of the whole image (channel mean/std and Gram
matrices of conv features); guided by the full-image denoising loss with a style clause."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from guided_concepts.concepts.base import Concept, ConceptConfig, ConceptOutput, OffsetHead, StepView, WordLossConfig
from guided_concepts.losses import offset_l2


# Conv channels whose Gram matrix describes the style: never varied (a key until the second
# redesign; an old run's concepts.style.gram_channels is dropped with a warning).
GRAM_CHANNELS = 8


@dataclass
class StyleConfig(ConceptConfig):
    token: str = field(default="*t", metadata={"help": "placeholder word for the style"})
    initializer: str = field(default="style", metadata={"help": "vocabulary word the embedding starts from"})
    phrase: str = field(default="in the style of {token}", metadata={"help": "prompt clause"})
    fixed_norm: float = field(default=0.0, metadata={"help": "0: a free norm (the style word was never measured with a fixed one)"})


@dataclass
class StyleLossConfig(WordLossConfig):
    """The shared word losses: the full-image denoising loss guides *t."""
    offset_weight: float = field(default=1e-2, metadata={"help": "L2 penalty on the head's offset (a free norm: kept small)"})


def gram_upper(features: torch.Tensor) -> torch.Tensor:
    """features [B, C, h, w] -> upper triangle of the normalised Gram matrix [B, C(C+1)/2]."""
    b, c = features.shape[:2]
    flat = features.flatten(2)                                              # [B, C, hw]
    gram = flat @ flat.transpose(1, 2) / flat.shape[-1]                     # [B, C, C]
    i, j = torch.triu_indices(c, c)
    return gram[:, i, j]


class StyleStatistics(nn.Module):
    """image [B, 3, H, W] -> [B, 6 + C(C+1)/2]: channel mean/std, Gram of conv features."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        self.out_dim = 6 + channels * (channels + 1) // 2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)
        return torch.cat([stats, gram_upper(self.conv(x))], dim=1)


class StyleConcept(Concept):
    name = "style"

    def __init__(self, config: StyleConfig, loss_config: StyleLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        self.statistics = StyleStatistics(GRAM_CHANNELS)
        self.head = OffsetHead(self.statistics.out_dim, initializer_row, config.num_vectors, config.hidden_dim,
                               config.scale, config.train_rows, config.fixed_norm)

    def encode(self, batch: dict) -> ConceptOutput:
        return self.head(self.statistics(batch["image"]))

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: StepView):
        return {"offset_l2": (self.loss_config.offset_weight, offset_l2(out.offset))}
