"""What every concept shares: its word, the offset path from a head's features to an embedding,
and the contract the training loop relies on."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ConceptConfig:
    token: str = field(default="*x", metadata={"help": "placeholder word written in prompts"})
    initializer: str = field(default="object", metadata={"help": "vocabulary word (one token) the embedding starts from"})
    num_vectors: int = field(default=1, metadata={"help": "embedding vectors behind the word"})
    phrase: str = field(default="{token}", metadata={"help": "prompt clause for this concept; {token} is replaced; with {category} the clause goes on the noun ('{token} {category}': 'a *a chair') instead of after it"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of this concept's head"})
    scale: float = field(default=0.1, metadata={"help": "embedding = initializer + scale * offset"})
    hidden_dim: int = field(default=128, metadata={"help": "width of the head's MLP"})
    train_rows: bool = field(default=True, metadata={"help": "also learn the placeholder rows (start: the initializer word)"})
    fixed_norm: float = field(default=0.9, metadata={"help": "each vector has this norm and only its direction is learned (NeTI / Directional Textual Inversion); 0: free. A loss then cannot be met by growing one shared word"})


@dataclass
class WordLossConfig:
    """The loss settings every word shares (each concept's loss config adds its own)."""
    offset_weight: float = field(default=0.0, metadata={"help": "L2 penalty on the head's offset (0: with a fixed norm the offset cannot grow the word)"})
    contrast_weight: float = field(default=0.0, metadata={"help": "word contrast: the denoising error with this word must be below the error with another object's word (one extra UNet pass a step)"})
    contrast_margin: float = field(default=0.05, metadata={"help": "word contrast: log-ratio margin the other object's word must lose by"})
    target_weight: float = field(default=0.0, metadata={"help": "object-level words: pull the word toward its object's target word in train.word_targets (tune.py --targets: the run's own words after a few tuning steps per object; HyperDreamBooth-style regression)"})


@dataclass
class ConceptOutput:
    embeds: torch.Tensor    # [B, K, D] written at the placeholder positions
    offset: torch.Tensor    # [B, K, D] what the offset L2 penalises
    extras: dict = field(default_factory=dict)


class OffsetHead(nn.Module):
    """features [B, F] -> rows + scale * MLP(features), reshaped to [B, K, D].

    The last layer starts at zero, so at step 0 the word is exactly its initializer word (with
    fixed_norm: the initializer's direction at that norm). in_dim 0: no MLP, the word is the rows
    alone (plain textual inversion); forward then takes the batch size.
    """

    def __init__(self, in_dim: int, rows: torch.Tensor, num_vectors: int, hidden_dim: int, scale: float,
                 train_rows: bool, fixed_norm: float = 0.0):
        super().__init__()
        rows = rows.detach().float().reshape(1, -1).repeat(num_vectors, 1)     # [K, D]
        self.rows = nn.Parameter(rows, requires_grad=train_rows)
        self.scale = scale
        self.fixed_norm = fixed_norm
        self.mlp = None
        if in_dim > 0:
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU(),
                                     nn.Linear(hidden_dim, rows.numel()))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor | int) -> ConceptOutput:
        if self.mlp is None:                                                    # features: the batch size
            offset = self.rows.new_zeros(features, *self.rows.shape)            # [B, K, D]
        else:
            offset = self.mlp(features).view(features.shape[0], *self.rows.shape)   # [B, K, D]
        embeds = self.rows + self.scale * offset
        if self.fixed_norm > 0:
            embeds = embeds * (self.fixed_norm / embeds.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        return ConceptOutput(embeds=embeds, offset=offset)


CONV_POOLS = ("mean", "mean_max")


class ConvEncoder(nn.Module):
    """A small CNN: maps [B, C, H, W] (masks, heatmaps, pixels) -> features [B, width*4]."""

    def __init__(self, in_channels: int = 1, width: int = 16, size: int = 64, pool: str = "mean"):
        super().__init__()
        if pool not in CONV_POOLS:
            raise ValueError(f"pool must be one of {CONV_POOLS}, got {pool!r}")
        self.size, self.pool = size, pool
        layers, c = [], in_channels
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            c = out
        self.net = nn.Sequential(*layers)
        # mean_max: a small part (an arm) moves the mean of a feature map little but its max fully.
        self.out_dim = c * (2 if pool == "mean_max" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x.float(), size=(self.size, self.size), mode="area")
        maps = self.net(x.float())                                       # [B, C, h, w]
        mean = maps.mean(dim=(-2, -1))
        return torch.cat([mean, maps.amax(dim=(-2, -1))], dim=-1) if self.pool == "mean_max" else mean


@dataclass(frozen=True)
class Requirements:
    """What a word needs from the data and the model, asked in one place (Concept.requirements)."""
    data: tuple[str, ...] = ()            # batch fields its head or losses read: "mask", "camera",
                                          # "keypoints", "mask_set", "mask_set_shading"
    image_encoder: bool = False           # the frozen image encoder (a head that reads pixels)
    mask_set: tuple[int, int] = (0, 64)   # (views, resolution) of the mask set, when data has "mask_set"


class WordSource:
    """The optional part of the contract: giving a word in values on the command line instead of an
    object folder (pose: --pose azimuth=30), and generation-time switches (shape: --shape-source).
    Every member has a default that does nothing."""
    value_flags: tuple[str, ...] = ()   # its own flags giving the word in values instead of an object folder

    @classmethod
    def add_source_args(cls, parser) -> None:
        """Adds value_flags to generate.py's and export.py's parsers (beside --<name>-from)."""

    @classmethod
    def add_generation_args(cls, parser) -> None:
        """generate.py's switches for this word (read back in apply_generation_options)."""

    @classmethod
    def source_from_args(cls, args):
        """The word's source given by those flags (None: none given)."""
        return None

    @classmethod
    def source_batch(cls, source, config) -> dict | None:
        """A batch of one built from such a source (None: the source is an object folder)."""
        return None

    @classmethod
    def source_record(cls, batch: dict) -> dict:
        """How export's manifest records a source_batch's source."""
        return {"type": "values"}

    def apply_generation_options(self, options) -> None:
        """Set generation-time switches on the head from generate.py's args (see add_generation_args)."""


class Concept(nn.Module, WordSource, ABC):
    """One learned word: `encode(batch)` gives its embeddings, `guidance_losses` its losses.

    Required (abstract): `name`, `encode`, `guidance_losses`, and a constructor
    `(config, loss_config, initializer_row, image_encoder)`.
    Optional, with defaults: `attention` (a loss reads the word's cross-attention map),
    `object_level` (one word per object; False: it varies per view, like the pose),
    `requirements` (what it needs from the data and the model), `check_settings`, `requires`
    (other words it needs), `trains_attention`, `validation_metrics`, `fit_to_data`,
    `reads_view_camera`; and the WordSource part (command-line sources).
    """
    name = "concept"
    attention = False
    object_level = True     # one word per object (False: it varies per view, e.g. the pose)
    reads_view_camera = False   # samples of a word read from a view's camera are scored at that camera

    # -- required ----------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, batch: dict) -> ConceptOutput:
        """The word's embedding [B, K, D] (and what its losses need) from its own input."""

    @abstractmethod
    def guidance_losses(self, out: ConceptOutput, batch: dict, step: "StepView") -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, per-sample value [B]). The loop weights, reduces and logs each; a
        weight of 0 is a metric: logged, not optimised."""

    # -- optional ----------------------------------------------------------------------------------
    @classmethod
    def requirements(cls, config, at_generation: bool = False, options: dict | None = None) -> Requirements:
        """What the word needs with these settings: data fields (checked before training; at
        generation, what a reference object must hold, given generate.py's options), the frozen
        image encoder, the mask set its head reads."""
        return Requirements(image_encoder=bool(getattr(config, "use_image", False)))

    @classmethod
    def check_settings(cls, config, loss_config) -> None:
        """Raise ValueError naming the key when the config and loss config do not fit together."""

    @classmethod
    def requires(cls, config, loss_config) -> dict[str, str]:
        """Other concepts this one needs with these settings: name -> the key that asks for it
        (checked in one place, concepts.check_requirements)."""
        return {}

    def trains_attention(self) -> bool:
        """Does a training loss read this word's map? If no active word's does, training runs the
        UNet without capture (e.g. an ablation at mask weight 0); evaluation still captures."""
        return False

    def validation_metrics(self, out: ConceptOutput, batch: dict) -> dict[str, torch.Tensor]:
        """Held-out measurements (name -> [B]) logged at each validation."""
        return {}

    @classmethod
    def fit_to_data(cls, config, dataset_info: dict):
        """Fill config fields left null that come from the data (e.g. camera bounds) before
        building. Returns the config; the run records the filled values in its data.json."""
        return config


@dataclass
class StepView:
    """What a guidance loss may look at in the current step."""
    timesteps: torch.Tensor                          # [B]
    attention: dict[str, torch.Tensor] | None        # concept -> [B, h, w] cross-attention map
    pred: torch.Tensor                               # [B, C, h, w] UNet output
    target: torch.Tensor                             # [B, C, h, w] denoising target
    same_object: torch.Tensor | None = None          # [B, B] bool: other views of the same object
    same_camera: torch.Tensor | None = None          # [B, B] bool: other objects at the same camera


def in_timestep_range(timesteps: torch.Tensor, t_range) -> torch.Tensor:
    """[B] float 0/1: where an attention loss applies (at high noise the object is not visible)."""
    lo, hi = t_range
    return ((timesteps >= lo) & (timesteps < hi)).float()
