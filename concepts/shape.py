"""Shape `*s`: a head reads the object's masks, from one view or, with the set encoder, from
all its views; its cross-attention map is pulled toward the mask of the view being denoised.

The set encoder pools any number of masks (with their cameras) into a Gaussian shape code
(mu, log sigma^2); training samples it, and at generation `diversity` tau scales sigma: tau = 0 is
the mean (deterministic, most faithful), 1 the trained spread, > 1 more varied. This is the
seeds' "diversity compensation". An optional image branch (a frozen image encoder) predicts the
same code from one RGB view, tied to the mask branch by an alignment loss, so `*s` can come from
masks alone or from one image alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from guided_concepts.concepts.base import (CONV_POOLS, Concept, ConceptConfig, ConceptOutput, ConvEncoder, OffsetHead,
                                            StepView, in_timestep_range, Requirements, WordLossConfig)
from guided_concepts.choices import check_choices
from guided_concepts.losses import (ALIGNMENT_KINDS, MASK_ATTENTION_VARIANTS, alignment_loss, consistency_loss,
                                    gaussian_kl, identity_loss, mask_attention_loss, offset_l2)

SHAPE_ENCODERS = ("set", "view", "none")
MASK_INPUTS = ("mask", "mask_shading")
ATTENTION_TARGETS = ("shape", "shape_pose_union")

@dataclass
class ShapeConfig(ConceptConfig):
    token: str = field(default="*s", metadata={"help": "placeholder word for the shape"})
    initializer: str = field(default="object", metadata={"help": "vocabulary word the embedding starts from"})
    phrase: str = field(default="in the shape of {token}", metadata={"help": "prompt clause"})
    encoder: Literal[SHAPE_ENCODERS] = field(default="set", metadata={"help": "set: all the object's masks (+cameras) pooled into a Gaussian code; view: the denoised view's mask only; none: no encoder, one learned word (plain textual inversion: reads no masks)"})
    max_views: int = field(default=8, metadata={"help": "set encoder: masks per object it sees (a random 1..max subset in training)"})
    use_cameras: bool = field(default=True, metadata={"help": "set encoder: each mask token also carries its camera angles"})
    code_dim: int = field(default=32, metadata={"help": "size of the shape code z"})
    use_image: bool = field(default=False, metadata={"help": "image branch: the frozen image encoder predicts the code from one RGB view"})
    mask_resolution: int = field(default=64, metadata={"help": "set encoder: side in pixels its masks are read at (area-resized from the mask files; files larger than data.resolution keep parts such as an armrest that the training views lose)"})
    mask_width: int = field(default=16, metadata={"help": "channels of the mask CNN's first layer"})
    mask_input: Literal[MASK_INPUTS] = field(default="mask", metadata={"help": "set encoder input per view: mask, or mask_shading (also the view's brightness inside the mask, standardised per view: parts such as an armrest that a 32 px silhouette hides, without the colour)"})
    mask_pool: Literal[CONV_POOLS] = field(default="mean", metadata={"help": "how the mask CNN pools its last feature maps: mean, or mean_max (also the max, so a small part like an arm moves the features)"})
    standardize: bool = field(default=True, metadata={"help": "standardise the code across objects (batch norm without affine; running statistics after training): mask features differ little between objects, so unscaled the code's object part drowns in its noise and the head learns to ignore it"})
    logvar_init: float = field(default=-4.0, metadata={"help": "set encoder: the code's log variance starts here; a wide code (0: sigma 1) drowns the masks' signal in noise early on"})

    def __post_init__(self):
        check_choices(self)
        if self.mask_input != "mask" and self.encoder != "set":
            raise ValueError("concepts.shape.mask_input: mask_shading needs encoder: set")
        if self.encoder == "none" and (not self.train_rows or self.use_image):
            raise ValueError("concepts.shape.encoder: none is one learned word: it needs train_rows: true and no use_image")
        if not 16 <= self.mask_resolution <= 1024:
            raise ValueError(f"concepts.shape.mask_resolution: {self.mask_resolution} is not in [16, 1024]")

@dataclass
class ShapeLossConfig(WordLossConfig):
    mask_weight: float = field(default=0.0, metadata={"help": "mask cross-attention loss weight (the lab notes: 0.1; off in the recipe: the word met it by growing, docs/toyworld)"})
    mask_variant: Literal[MASK_ATTENTION_VARIANTS] = field(default="mass_ratio", metadata={"help": f"one of {MASK_ATTENTION_VARIANTS}"})
    mask_t_range: tuple[int, int] = field(default=(0, 600), metadata={"help": "timesteps [lo, hi) where the mask loss applies; at high noise the object is not visible"})
    attention_target: Literal[ATTENTION_TARGETS] = field(default="shape", metadata={"help": "shape: *s's map vs the view's mask; shape_pose_union: *s + *p maps vs the mask (needs pose)"})
    view_consistency_weight: float = field(default=0.1, metadata={"help": "pull *s of one object's views together (needs multi-view batches)"})
    identity_weight: float = field(default=0.1, metadata={"help": "set encoder: supervised contrast on the code's mean; views of one object pick each other out of the batch (an object code, not a view code)"})
    kl_weight: float = field(default=1e-3, metadata={"help": "set encoder: KL of the shape code toward N(0, I)"})
    align_weight: float = field(default=0.1, metadata={"help": "image branch: tie its code to the mask branch's"})
    align_kind: Literal[ALIGNMENT_KINDS] = field(default="cosine", metadata={"help": f"one of {ALIGNMENT_KINDS}: cosine ties each object's two codes directly; infonce also separates objects"})

    def __post_init__(self):
        check_choices(self)
        self.mask_t_range = tuple(self.mask_t_range)

class MaskSetEncoder(nn.Module):
    """masks [B, S, 1, r, r] (+ valid [B, S], cameras [B, S, 3]) -> (mu, logvar) [B, Z] each.

    Attention pooling with a learned query: invariant to the order of the views, any S >= 1.
    """

    def __init__(self, width: int, code_dim: int, use_cameras: bool, logvar_init: float = 0.0,
                 standardize: bool = False, pool: str = "mean", in_channels: int = 1, size: int = 64):
        super().__init__()
        self.cnn = ConvEncoder(in_channels=in_channels, width=width, size=size, pool=pool)
        dim = self.cnn.out_dim
        self.use_cameras = use_cameras
        self.camera = nn.Linear(3, dim) if use_cameras else None   # (sin az, cos az, elevation/90)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = nn.MultiheadAttention(dim, num_heads=4, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.to_stats = nn.Linear(dim, 2 * code_dim)
        with torch.no_grad():
            self.to_stats.bias[code_dim:] += logvar_init
        self.standardize = nn.BatchNorm1d(code_dim, affine=False, momentum=0.1) if standardize else None

    def forward(self, masks, valid, cameras=None):
        """masks [B, S, C, r, r]: C = 1 (mask) or 2 (mask, shading)."""
        b, s = masks.shape[:2]
        tokens = self.cnn(masks.flatten(0, 1)).view(b, s, -1)                 # [B, S, F]
        if self.camera is not None and cameras is not None:
            az = torch.deg2rad(cameras[..., 0].float())
            angles = torch.stack([az.sin(), az.cos(), cameras[..., 1].float() / 90], dim=-1)
            tokens = tokens + self.camera(angles)
        pooled, _ = self.pool(self.query.expand(b, -1, -1), tokens, tokens, key_padding_mask=~valid)  # [B, 1, F]
        mu, logvar = self.to_stats(self.norm(pooled[:, 0])).chunk(2, dim=-1)  # [B, Z] each
        if self.standardize is not None:
            mu = self.standardize(mu)                                         # unit spread across objects
        return mu, logvar.clamp(-8, 4)

class ShapeConcept(Concept):
    name = "shape"
    attention = True

    @classmethod
    def check_settings(cls, config: ShapeConfig, loss_config: ShapeLossConfig) -> None:
        if config.encoder == "none" and loss_config.mask_weight > 0:
            raise ValueError("losses.shape.mask_weight: concepts.shape.encoder none reads no masks; set it to 0")

    @classmethod
    def requires(cls, config: ShapeConfig, loss_config: ShapeLossConfig) -> dict[str, str]:
        # The union target compares *s's and *p's maps together with the mask.
        return {"pose": "losses.shape.attention_target: shape_pose_union"} \
            if loss_config.attention_target == "shape_pose_union" else {}

    @classmethod
    def add_generation_args(cls, parser) -> None:
        parser.add_argument("--shape-source", choices=["masks", "image"], default="masks",
                            help="encode *s from the object's masks, or from one RGB view (needs an image branch)")

    def apply_generation_options(self, options: dict) -> None:
        source = options.get("shape_source", "masks")
        if source not in ("masks", "image"):
            raise ValueError(f"shape source must be 'masks' or 'image', got {source!r}")
        self.source = source

    @classmethod
    def requirements(cls, config: ShapeConfig, at_generation: bool = False, options: dict | None = None) -> Requirements:
        if config.encoder == "none" or (at_generation and (options or {}).get("shape_source") == "image"):
            data = ()                        # one learned word, or the code from one RGB view
        elif config.encoder != "set":
            data = ("mask",)
        else:
            data = ("mask", "mask_set", "mask_set_shading") if config.mask_input == "mask_shading" else ("mask", "mask_set")
        return Requirements(data=data, image_encoder=config.use_image, mask_set=(config.max_views, config.mask_resolution))

    def __init__(self, config: ShapeConfig, loss_config: ShapeLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        self.diversity = 0.0          # tau at generation (training always samples tau = 1)
        self.source = "masks"         # or "image": the code from one RGB view (image branch)
        self.noise_generator: torch.Generator | None = None
        self.check_settings(config, loss_config)
        if config.encoder == "none":
            in_dim = 0
        elif config.encoder == "set":
            self.set_encoder = MaskSetEncoder(config.mask_width, config.code_dim, config.use_cameras, config.logvar_init,
                                              config.standardize, config.mask_pool,
                                              in_channels=2 if config.mask_input == "mask_shading" else 1,
                                              size=config.mask_resolution)
            in_dim = config.code_dim
        else:
            self.mask_encoder = ConvEncoder(in_channels=1, width=config.mask_width, pool=config.mask_pool)
            in_dim = self.mask_encoder.out_dim
            self.standardize = nn.BatchNorm1d(in_dim, affine=False, momentum=0.1) if config.standardize else None
        self.image_encoder = None
        if config.use_image:
            if image_encoder is None:
                raise ValueError("concepts.shape.use_image is true but the model has no image encoder")
            self.image_encoder = image_encoder
            self.image_to_code = nn.Sequential(nn.Linear(image_encoder.out_dim, config.hidden_dim),
                                               nn.LayerNorm(config.hidden_dim), nn.SiLU(),
                                               nn.Linear(config.hidden_dim, in_dim))
        self.head = OffsetHead(in_dim, initializer_row, config.num_vectors, config.hidden_dim, config.scale,
                               config.train_rows, config.fixed_norm)

    def mask_code(self, batch: dict):
        """-> (z, mu, logvar) from the masks; mu/logvar are None for the single-view encoder."""
        if self.config.encoder == "view":
            z = self.mask_encoder(batch["mask"])
            if self.standardize is not None:
                z = self.standardize(z)
            return z, None, None
        if "mask_set" in batch:
            masks, valid, cameras = batch["mask_set"], batch["mask_set_valid"], batch.get("mask_set_camera")
        else:   # no set given: the view's own mask is a set of one
            masks, valid, cameras = batch["mask"][:, None], torch.ones_like(batch["mask"][:, 0, 0, 0]).bool()[:, None], \
                batch.get("camera", None)
            cameras = cameras[:, None] if cameras is not None else None
        if self.config.mask_input == "mask_shading":                         # [B, S, 2, r, r]
            shading = batch.get("mask_set_shading") if "mask_set" in batch else None
            masks = torch.cat([masks, shading if shading is not None else torch.zeros_like(masks)], dim=2)
        mu, logvar = self.set_encoder(masks, valid.bool(), cameras if self.config.use_cameras else None)
        tau = 1.0 if self.training else self.diversity
        if tau == 0:
            return mu, mu, logvar
        noise = torch.randn(mu.shape, generator=self.noise_generator).to(mu.device)
        return mu + tau * (0.5 * logvar).exp() * noise, mu, logvar

    def encode(self, batch: dict) -> ConceptOutput:
        if self.config.encoder == "none":                  # one word for every object
            return self.head(len(batch["category"]))
        extras = {}
        if self.source == "image" and not self.training:
            z = self.image_code(batch)
        else:
            z, mu, logvar = self.mask_code(batch)
            extras.update(mu=mu, logvar=logvar)
            if self.image_encoder is not None:
                extras["image_code"] = self.image_code(batch)
        out = self.head(z)
        out.extras.update({"code": z, **{k: v for k, v in extras.items() if v is not None}})
        return out

    def image_code(self, batch: dict) -> torch.Tensor:
        if self.image_encoder is None:
            raise ValueError("shape source 'image' needs concepts.shape.use_image: true at training")
        return self.image_to_code(self.image_encoder(batch["image"]))

    def trains_attention(self) -> bool:
        return self.loss_config.mask_weight > 0

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: StepView):
        lc = self.loss_config
        losses = {"offset_l2": (lc.offset_weight, offset_l2(out.offset))}
        if lc.mask_weight > 0 and step.attention is not None:
            attn = step.attention[self.name]
            if lc.attention_target == "shape_pose_union":   # shape and pose together explain the view
                attn = attn + step.attention["pose"]
            per_sample = mask_attention_loss(attn, batch["mask"], lc.mask_variant)
            losses["mask_attention"] = (lc.mask_weight, per_sample * in_timestep_range(step.timesteps, lc.mask_t_range))
        if lc.view_consistency_weight > 0 and step.same_object is not None:
            # On the code's mean, not the sampled code: views draw their own noise, and pulling
            # samples together would teach the head to ignore the code (mu collapses).
            code = out.extras.get("mu", out.offset)
            losses["view_consistency"] = (lc.view_consistency_weight, consistency_loss(code[:, None], step.same_object))
        if "mu" in out.extras and lc.identity_weight > 0 and "object_index" in batch:
            losses["identity"] = (lc.identity_weight, identity_loss(out.extras["mu"], batch["object_index"]))
        if "mu" in out.extras and lc.kl_weight > 0:
            losses["kl"] = (lc.kl_weight, gaussian_kl(out.extras["mu"], out.extras["logvar"]))
        if "image_code" in out.extras and lc.align_weight > 0:
            target = out.extras.get("mu", out.extras["code"])
            losses["align"] = (lc.align_weight, alignment_loss(target, out.extras["image_code"],
                                                                batch.get("object_index"), lc.align_kind))
        return losses

    def validation_metrics(self, out: ConceptOutput, batch: dict) -> dict[str, torch.Tensor]:
        if "image_code" not in out.extras:
            return {}
        target = out.extras.get("mu", out.extras["code"])
        return {"mask_image_cosine": F.cosine_similarity(target, out.extras["image_code"], dim=-1)}
