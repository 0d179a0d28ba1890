"""Pose `*p`: a head reads the camera (and/or 2D keypoints, or the image) and gives a word whose
norm stays that of a real word. Guided by (a) a probe that recovers the camera from the word,
(b) keypoint-guided attention, (c) consistency across objects seen from the same camera."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from guided_concepts.concepts.base import Concept, ConceptConfig, ConceptOutput, ConvEncoder, OffsetHead, StepView, in_timestep_range, Requirements, WordLossConfig
from guided_concepts.losses import consistency_loss, mask_attention_loss, offset_l2
from guided_concepts.objectdata.heatmaps import has_keypoints, keypoint_heatmaps
from guided_concepts.objectdata.meta import camera_problem

POSE_INPUTS = ("camera", "keypoints", "image")


# Keypoint heatmap size fed to the keypoint CNN: never varied (a key until the second redesign;
# an old run's concepts.pose.heatmap_size is dropped with a warning).
HEATMAP_SIZE = 32


@dataclass
class PoseConfig(ConceptConfig):
    token: str = field(default="*p", metadata={"help": "placeholder word for the pose"})
    initializer: str = field(default="pose", metadata={"help": "vocabulary word the embedding starts from"})
    phrase: str = field(default="with pose {token}", metadata={"help": "prompt clause"})
    inputs: list[str] = field(default_factory=lambda: ["camera"], metadata={"help": f"what the head reads, any of {POSE_INPUTS}"})
    fourier_bands: int = field(default=6, metadata={"help": "Fourier feature frequencies of the camera"})
    norm_to_initializer: bool = field(default=False, metadata={"help": "rescale each vector to the initializer word's norm"})
    elevation_range: list[float] | None = field(default=None, metadata={"help": "dataset-wide elevation bounds (deg); null = from the data (the run records them in data.json)"})
    distance_range: list[float] | None = field(default=None, metadata={"help": "dataset-wide distance bounds; null = from the data (recorded in data.json)"})
    num_keypoints: int | None = field(default=None, metadata={"help": "keypoints per view; null = from the data (recorded in data.json)"})

    def __post_init__(self):
        bad = [i for i in self.inputs if i not in POSE_INPUTS]
        if bad or not self.inputs:
            raise ValueError(f"concepts.pose.inputs: {bad or 'empty'} not in {POSE_INPUTS}")


@dataclass
class PoseLossConfig(WordLossConfig):
    probe_weight: float = field(default=0.1, metadata={"help": "camera recovery from *p (probe MSE)"})
    keypoint_attention_weight: float = field(default=0.1, metadata={"help": "*p's attention mass on keypoint heatmaps (mask where none)"})
    attention_t_range: tuple[int, int] = field(default=(0, 600), metadata={"help": "timesteps [lo, hi) for the attention loss"})
    consistency_weight: float = field(default=0.1, metadata={"help": "same camera, different objects -> same *p"})

    def __post_init__(self):
        self.attention_t_range = tuple(self.attention_t_range)


def fourier_features(x: torch.Tensor, bands: int) -> torch.Tensor:
    """x [B, n] in about [-1, 1] -> [B, n * (1 + 2 * bands)]."""
    freqs = (2.0 ** torch.arange(bands, device=x.device)) * math.pi             # [F]
    angles = x[..., None] * freqs                                                 # [B, n, F]
    return torch.cat([x, angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)


def rescale(x: torch.Tensor, bounds) -> torch.Tensor:
    """Dataset bounds -> [-1, 1]; a degenerate range (e.g. one fixed distance) maps to 0, and
    values outside the training range are clamped rather than blown up."""
    lo, hi = bounds
    if hi - lo < 1e-6:
        return torch.zeros_like(x)
    return (2 * (x - lo) / (hi - lo) - 1).clamp(-1, 1)


class PoseConcept(Concept):
    name = "pose"
    attention = True
    object_level = False    # the camera's word: each view has its own

    reads_view_camera = True
    value_flags = ("--pose",)   # --pose azimuth=30,elevation=10

    @classmethod
    def requirements(cls, config: PoseConfig, at_generation: bool = False, options: dict | None = None) -> Requirements:
        return Requirements(data=tuple(i for i in config.inputs if i in ("camera", "keypoints")),
                            image_encoder=bool(getattr(config, "use_image", False)))

    @classmethod
    def add_source_args(cls, parser) -> None:
        parser.add_argument(cls.value_flags[0], help="explicit camera for the pose word: azimuth=30,elevation=10[,distance=2.5]")

    @classmethod
    def source_from_args(cls, args):
        return parse_camera(args.pose) if getattr(args, "pose", None) else None

    @classmethod
    def source_batch(cls, source, config: PoseConfig) -> dict | None:
        if not isinstance(source, dict):
            return None
        source = check_camera(source)       # the checks --pose has, for callers that pass a dict
        if "camera" not in config.inputs:
            raise ValueError(f"--pose gives a camera, but this run's pose head reads {config.inputs}; "
                             "use --pose-from <object folder>")
        return camera_batch(source, config.distance_range)

    @classmethod
    def source_record(cls, batch: dict) -> dict:
        azimuth, elevation, distance = (float(v) for v in batch["camera"][0])
        return {"type": "camera", "azimuth": azimuth, "elevation": elevation, "distance": distance}

    @classmethod
    def fit_to_data(cls, config: PoseConfig, info: dict) -> PoseConfig:
        if config.elevation_range is None and info.get("elevation"):
            config.elevation_range = [float(v) for v in info["elevation"]]
        if config.distance_range is None and info.get("distance"):
            config.distance_range = [float(v) for v in info["distance"]]
        if config.num_keypoints is None and info.get("num_keypoints"):
            config.num_keypoints = int(info["num_keypoints"])
        return config

    def __init__(self, config: PoseConfig, loss_config: PoseLossConfig, initializer_row: torch.Tensor,
                 image_encoder=None):
        super().__init__()
        self.config, self.loss_config = config, loss_config
        self.elevation_range = config.elevation_range or [-90.0, 90.0]
        self.distance_range = config.distance_range or [0.0, 10.0]
        in_dim = 0
        if "camera" in config.inputs:
            in_dim += 4 * (1 + 2 * config.fourier_bands)
        if "keypoints" in config.inputs:
            if not config.num_keypoints:
                raise ValueError("concepts.pose.inputs has 'keypoints' but num_keypoints is unknown; "
                                 "train on data with keypoints or set concepts.pose.num_keypoints")
            self.keypoint_encoder = ConvEncoder(in_channels=config.num_keypoints, size=HEATMAP_SIZE)
            in_dim += self.keypoint_encoder.out_dim
        if "image" in config.inputs:
            self.image_cnn = ConvEncoder(in_channels=3)
            in_dim += self.image_cnn.out_dim
        self.head = OffsetHead(in_dim, initializer_row, config.num_vectors, config.hidden_dim, config.scale,
                               config.train_rows, config.fixed_norm)
        self.register_buffer("initializer_norm", initializer_row.detach().float().norm(), persistent=False)
        dim = initializer_row.numel() * config.num_vectors
        # Probe: *p -> (sin az, cos az, elevation, distance), both rescaled to [-1, 1].
        self.probe = nn.Sequential(nn.Linear(dim, 128), nn.LayerNorm(128), nn.SiLU(), nn.Linear(128, 4))

    # -- camera <-> vector ------------------------------------------------------------------------
    def camera_vector(self, camera: torch.Tensor) -> torch.Tensor:
        """camera [B, 3] (azimuth deg, elevation deg, distance) -> [B, 4] in about [-1, 1]."""
        az = torch.deg2rad(camera[:, 0].float())
        return torch.stack([az.sin(), az.cos(), rescale(camera[:, 1].float(), self.elevation_range),
                            rescale(camera[:, 2].float(), self.distance_range)], dim=1)

    def encode(self, batch: dict) -> ConceptOutput:
        features = []
        if "camera" in self.config.inputs:
            features.append(fourier_features(self.camera_vector(batch["camera"]), self.config.fourier_bands))
        if "keypoints" in self.config.inputs:
            keypoints, valid = fit_keypoints(batch["keypoints"], batch["keypoint_valid"], self.config.num_keypoints)
            maps = keypoint_heatmaps_per_point(keypoints, valid, HEATMAP_SIZE)
            features.append(self.keypoint_encoder(maps))                      # [B, F]
        if "image" in self.config.inputs:
            features.append(self.image_cnn(batch["image"]))
        out = self.head(torch.cat(features, dim=1))
        if self.config.norm_to_initializer:
            # Keep *p's norm that of a real word: text encoders see words of about that size.
            norm = out.embeds.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            out.embeds = out.embeds * (self.initializer_norm / norm)
        # The probe runs in forward, so DDP sees (and averages) its gradients too.
        out.extras["camera_pred"] = self.probe(out.embeds.flatten(1).float())   # [B, 4]
        return out

    @staticmethod
    def azimuth_error(camera_pred: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """Absolute azimuth error of the probe in degrees: camera_pred [B, 4], camera [B, 3] -> [B]"""
        pred = camera_pred
        predicted = torch.rad2deg(torch.atan2(pred[:, 0], pred[:, 1]))
        diff = (predicted - camera[:, 0].float() + 180) % 360 - 180
        return diff.abs()

    def validation_metrics(self, out: ConceptOutput, batch: dict) -> dict[str, torch.Tensor]:
        has = batch["has_camera"].bool()
        if not has.any():
            return {}
        return {"azimuth_error_deg": self.azimuth_error(out.extras["camera_pred"], batch["camera"])[has]}

    def trains_attention(self) -> bool:
        return self.loss_config.keypoint_attention_weight > 0

    def guidance_losses(self, out: ConceptOutput, batch: dict, step: StepView):
        lc = self.loss_config
        losses = {"offset_l2": (lc.offset_weight, offset_l2(out.offset))}
        if "camera" in batch and "has_camera" in batch:
            has = batch["has_camera"].float()
            err = (out.extras["camera_pred"] - self.camera_vector(batch["camera"])).pow(2).mean(1)
            losses["probe"] = (lc.probe_weight, err * has)
            losses["azimuth_error_deg"] = (0.0, self.azimuth_error(out.extras["camera_pred"].detach(), batch["camera"]) * has)
        if lc.keypoint_attention_weight > 0 and step.attention is not None:
            attn = step.attention[self.name]                                   # [B, h, w]
            target = attention_target(batch, attn.shape[-1])
            per_sample = mask_attention_loss(attn, target, "mass_ratio")
            losses["keypoint_attention"] = (lc.keypoint_attention_weight,
                                            per_sample * in_timestep_range(step.timesteps, lc.attention_t_range))
        if lc.consistency_weight > 0 and step.same_camera is not None:
            losses["camera_consistency"] = (lc.consistency_weight, consistency_loss(out.offset, step.same_camera))
        return losses


def fit_keypoints(keypoints: torch.Tensor, valid: torch.Tensor, count: int):
    """Pad (invalid) or cut [B, K, 2] / [B, K] to the head's keypoint count: another data set or
    object may list a different number of points than the training data."""
    k = keypoints.shape[1]
    if k >= count:
        return keypoints[:, :count], valid[:, :count]
    pad = count - k
    return (torch.cat([keypoints, keypoints.new_zeros(len(keypoints), pad, 2)], 1),
            torch.cat([valid, valid.new_zeros(len(valid), pad)], 1))


def keypoint_heatmaps_per_point(keypoints: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """One heatmap channel per keypoint, so the CNN knows which point is which.  -> [B, K, size, size]"""
    b, k = valid.shape
    maps = keypoint_heatmaps(keypoints.reshape(b * k, 1, 2), valid.reshape(b * k, 1), size)
    return maps.view(b, k, size, size)


def attention_target(batch: dict, size: int) -> torch.Tensor:
    """Keypoint heatmap [B, 1, size, size] where the sample has keypoints, its mask elsewhere."""
    mask = nn.functional.interpolate(batch["mask"].float(), size=(size, size), mode="area")
    if "keypoints" not in batch:
        return mask
    heat = keypoint_heatmaps(batch["keypoints"], batch["keypoint_valid"], size)
    use = has_keypoints(batch["keypoint_valid"]).view(-1, 1, 1, 1)
    return torch.where(use, heat, mask)


def parse_camera(text: str) -> dict:
    """'azimuth=30,elevation=10[,distance=2.5]' -> {"azimuth", "elevation", "distance" (None: the
    middle of the trained range)}, checked as training checks a view's camera (check_camera)."""
    values = {"azimuth": None, "elevation": 0.0, "distance": None}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in values or not value.strip():
            raise ValueError(f"--pose {text!r}: expected azimuth=A,elevation=E[,distance=D]")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--pose {text!r}: {key.strip()} must be a number, got {value.strip()!r}") from None
    if values["azimuth"] is None:
        raise ValueError(f"--pose {text!r}: azimuth is required")
    return check_camera(values, f"--pose {text!r}")


def check_camera(values, where: str = "pose camera") -> dict:
    """A camera given in values (--pose, or a dict a caller passes) -> {"azimuth", "elevation",
    "distance"}, with the ranges training's data checks use (objectdata/meta.py): azimuth in
    [-360, 360] and elevation in [-90, 90] degrees, distance finite and > 0 (None: the middle of
    the trained range). ValueError naming `where` and the value otherwise."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: a camera is a dict of azimuth, elevation, distance, got {values!r}")
    unknown = [k for k in values if k not in ("azimuth", "elevation", "distance")]
    if unknown:
        raise ValueError(f"{where}: unknown camera key {unknown[0]!r}; valid: azimuth, elevation, distance")
    camera = {key: values.get(key) for key in ("azimuth", "elevation", "distance")}
    if camera["elevation"] is None:     # as --pose: the horizon unless given
        camera["elevation"] = 0.0
    for key, value in camera.items():
        if value is None and key != "distance":
            raise ValueError(f"{where}: {key} is required")
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    camera = {key: None if value is None else float(value) for key, value in camera.items()}
    problem = camera_problem(camera)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return camera


def camera_batch(values: dict, distance_range) -> dict:
    """A batch of one holding that camera (what the pose head reads)."""
    distance = values["distance"] if values["distance"] is not None else sum(distance_range or [2.5, 2.5]) / 2
    camera = torch.tensor([[values["azimuth"], values["elevation"], distance]])
    return {"camera": camera, "has_camera": torch.tensor([True]), "category": ["object"]}
