"""What every concept shares: its word, the offset path from a head's features to an embedding,
and the contract the training loop relies on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ConceptConfig:
    token: str = field(default="*x", metadata={"help": "placeholder word written in prompts"})
    initializer: str = field(default="object", metadata={"help": "vocabulary word (one token) the embedding starts from"})
    num_vectors: int = field(default=1, metadata={"help": "embedding vectors behind the word"})
    phrase: str = field(default="{token}", metadata={"help": "prompt clause for this concept; {token} is replaced"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of this concept's head"})
    scale: float = field(default=0.1, metadata={"help": "embedding = initializer + scale * offset"})
    hidden_dim: int = field(default=128, metadata={"help": "width of the head's MLP"})
    train_rows: bool = field(default=True, metadata={"help": "also learn the placeholder rows (start: the initializer word)"})


@dataclass
class ConceptOutput:
    embeds: torch.Tensor    # [B, K, D] written at the placeholder positions
    offset: torch.Tensor    # [B, K, D] what the offset L2 penalises
    extras: dict = field(default_factory=dict)


class OffsetHead(nn.Module):
    """features [B, F] -> rows + scale * MLP(features), reshaped to [B, K, D].

    The last layer starts at zero, so at step 0 the word is exactly its initializer word.
    """

    def __init__(self, in_dim: int, rows: torch.Tensor, num_vectors: int, hidden_dim: int, scale: float,
                 train_rows: bool):
        super().__init__()
        rows = rows.detach().float().reshape(1, -1).repeat(num_vectors, 1)     # [K, D]
        self.rows = nn.Parameter(rows, requires_grad=train_rows)
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, rows.numel()))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor) -> ConceptOutput:
        offset = self.mlp(features).view(features.shape[0], *self.rows.shape)   # [B, K, D]
        return ConceptOutput(embeds=self.rows + self.scale * offset, offset=offset)


class MaskEncoder(nn.Module):
    """A small CNN: mask [B, 1, H, W] -> features [B, width*4]."""

    def __init__(self, in_channels: int = 1, width: int = 16, size: int = 64):
        super().__init__()
        self.size = size
        layers, c = [], in_channels
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            c = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x.float(), size=(self.size, self.size), mode="area")
        return self.net(x.float())


class Concept(nn.Module):
    """One learned word: `encode(batch)` gives its embeddings, `guidance_losses` its losses.

    Subclasses set `name`, `needs` (batch keys the head reads; the data check uses it) and
    `attention` (True if a loss reads the word's cross-attention map).
    """
    name = "concept"
    needs: tuple[str, ...] = ()
    attention = False

    def encode(self, batch: dict) -> ConceptOutput:
        raise NotImplementedError

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: "StepView") -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, per-sample loss [B]). The loop weights, reduces and logs each."""
        raise NotImplementedError


@dataclass
class StepView:
    """What a guidance loss may look at in the current step."""
    timesteps: torch.Tensor                          # [B]
    attention: dict[str, torch.Tensor] | None        # concept -> [B, h, w] cross-attention map
    pred: torch.Tensor                               # [B, C, h, w] UNet output
    target: torch.Tensor                             # [B, C, h, w] denoising target
