"""The ground-truth scorer: a small CNN that reads a ToyWorld image's attributes.

It predicts colour, arms, back height and viewing direction (toyworld.world.ATTRIBUTES) from an
RGB image in [0, 1]. Trained on renders with blur and noise, so generated images (softer than
renders) are read fairly. `silhouette` gives the object's pixels by their distance from the white
background, for IoU against a true render's mask.
"""
from __future__ import annotations

import json
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from guided_concepts.toyworld.world import ATTRIBUTES

SILHOUETTE_THRESHOLD = 0.5   # object when some channel is this far below white: half coverage of any colour (IoU 0.96 with the true masks of renders)


class Scorer(nn.Module):
    def __init__(self, width: int = 32, attributes: dict = ATTRIBUTES):
        super().__init__()
        self.attributes = dict(attributes)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())     # [B, 16*width]
        self.heads = nn.ModuleDict({name: nn.Linear(16 * width, n) for name, n in self.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] in [0,1] (resized to 32 px) -> attribute -> logits [B, classes]."""
        x = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        features = self.features(x * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> attribute -> class index [B]."""
        return {name: logits.argmax(-1) for name, logits in self(images).items()}


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """images [B,3,H,W] in [0,1] -> bool [B,H,W]: pixels some channel of which is far from white."""
    return (1 - images).amax(dim=1) > SILHOUETTE_THRESHOLD


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool [B,H,W] x2 -> IoU [B] (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and a small shift: what separates a generated image from a clean render."""
    b = len(images)
    sigma = (0.1 + 0.9 * torch.rand(b, 1, generator=generator)).expand(b, 2)   # per image
    blurred = kornia.filters.gaussian_blur2d(images, (5, 5), sigma)
    noise = 0.05 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    shifted = torch.roll(blurred + noise, shifts=shift, dims=(2, 3))
    return shifted.clamp(0, 1)


def train_scorer(data: dict, steps: int = 1500, batch: int = 128, seed: int = 0, log=print):
    """data: images uint8 [N,H,W,3], labels int64 [N,4], chair [N] (ids). Every 10th chair is
    held out to measure the scorer's own accuracy on renders. -> (scorer, summary)."""
    torch.manual_seed(seed)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(data["labels"])
    held = torch.from_numpy(np.isin(data["chair"], np.unique(data["chair"])[::10]))
    train_x, train_y, test_x, test_y = images[~held], labels[~held], images[held], labels[held]
    model = Scorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    names = list(ATTRIBUTES)
    for step in tqdm(range(steps), desc="scorer"):
        index = torch.randint(0, len(train_x), (batch,), generator=generator)
        logits = model(augment(train_x[index], generator))
        loss = sum(F.cross_entropy(logits[n], train_y[index, i]) for i, n in enumerate(names))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    predicted = {n: torch.cat([model.predict(test_x[s:s + 512])[n] for s in range(0, len(test_x), 512)]) for n in names}
    accuracy = {n: round(float((predicted[n] == test_y[:, i]).float().mean()), 4) for i, n in enumerate(names)}
    log(f"[scorer] accuracy on held-out renders: {accuracy}")
    return model, {"render_accuracy": accuracy, "train_images": int(len(train_x)), "test_images": int(len(test_x))}


def save_weights(model: nn.Module, folder: Path, config: dict) -> None:
    """A scorer's weights (model.safetensors) and what rebuilds it (config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def load_weights(folder: str | Path, build, model_kind: str) -> nn.Module:
    """build(config) -> the module, filled from folder/model.safetensors, in eval mode (fp32)."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no scorer (model.safetensors); it ships in {model_kind}'s scorer/")
    model = build(json.loads((folder / "config.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return model.eval()


def save_scorer(model: Scorer, folder: Path) -> None:
    width = model.heads[next(iter(model.heads))].in_features // 16
    save_weights(model, folder, {"width": width, "attributes": model.attributes})


def load_scorer(folder: str | Path) -> Scorer:
    return load_weights(folder, lambda c: Scorer(c["width"], c["attributes"]), "a ToyWorld model")
