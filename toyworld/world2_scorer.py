"""ToyWorld 2's scorer (groundwork): a small CNN that reads category, colour, viewing direction and
every shape parameter back from an image, and the measurement that chooses the world's resolution.

    python -m toyworld.world2_scorer --resolutions 32 48 64 --objects 600 --steps 1500

For each resolution: renders objects (every category, random shape, palette colour, random camera
and background level), trains the scorer on 90% of the objects, and reports on the other 10%
(unseen shapes) accuracy for category, colour and direction and mean absolute error for each shape
parameter (in [0, 1] units), per background level, with the training seconds beside them.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_concepts.toyworld.scorer import Scorer, augment
from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES, DIRECTIONS, ELEVATION_RANGE, DISTANCE_RANGE, direction_bin
from guided_concepts.toyworld.world2 import BACKGROUNDS, CATEGORIES, SHAPE_PARAMS, Shape, WorldObject, render

CLASSES = {"category": len(CATEGORIES), "colour": len(COLOURS), "direction": len(DIRECTIONS)}


def render_set(objects: int, views: int, resolution: int, seed: int = 0) -> dict:
    """-> images uint8 [N,H,W,3], classes int64 [N,3] (category, colour, direction), shape float32
    [N,6], background int64 [N], object int64 [N]."""
    rng = np.random.default_rng([seed, 2])
    out = {k: [] for k in ("images", "classes", "shape", "background", "object")}
    for index in range(objects):
        category, colour = index % len(CATEGORIES), int(rng.integers(len(COLOURS)))
        shape = Shape.sample(rng)
        obj = WorldObject(CATEGORIES[category], shape, COLOURS[COLOUR_NAMES[colour]])
        for _ in range(views):
            azimuth = float(rng.uniform(-180, 180))
            elevation, distance = float(rng.uniform(*ELEVATION_RANGE)), float(rng.uniform(*DISTANCE_RANGE))
            background = int(rng.integers(len(BACKGROUNDS)))
            image, _ = render(obj, azimuth, elevation, distance, resolution, background, int(rng.integers(1 << 30)))
            out["images"].append(image)
            out["classes"].append((category, colour, direction_bin(azimuth)))
            out["shape"].append([getattr(shape, n) for n in SHAPE_PARAMS])
            out["background"].append(background)
            out["object"].append(index)
    return {"images": np.stack(out["images"]), "classes": np.array(out["classes"], np.int64),
            "shape": np.array(out["shape"], np.float32), "background": np.array(out["background"], np.int64),
            "object": np.array(out["object"], np.int64)}


class Scorer2(nn.Module):
    """images [B,3,H,W] in [0,1] at `size` -> class logits per CLASSES name, and shape [B,6] in [0,1].
    ToyWorld 1's scorer trunk and class heads, read at `size` instead of 32 px, plus a shape head."""

    def __init__(self, size: int, width: int = 32):
        super().__init__()
        self.size = size
        self.trunk = Scorer(width, CLASSES)                    # .features [B, 16 * width], .heads per class
        self.shape = nn.Linear(16 * width, len(SHAPE_PARAMS))

    def forward(self, images: torch.Tensor):
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        features = self.trunk.features(x * 2 - 1)
        return {n: head(features) for n, head in self.trunk.heads.items()}, torch.sigmoid(self.shape(features))


def train_and_measure(data: dict, steps: int, batch: int = 96, seed: int = 0) -> dict:
    """Train on 90% of the objects, measure on the rest: per background level and overall."""
    torch.manual_seed(seed)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    classes, shapes = torch.from_numpy(data["classes"]), torch.from_numpy(data["shape"])
    held = torch.from_numpy(data["object"] % 10 == 9)
    model = Scorer2(images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    train_index = torch.nonzero(~held).squeeze(1)
    started = time.time()
    for _ in range(steps):
        index = train_index[torch.randint(0, len(train_index), (batch,), generator=generator)]
        logits, shape = model(augment(images[index], generator))
        loss = sum(F.cross_entropy(logits[n], classes[index, i]) for i, n in enumerate(CLASSES))
        loss = loss + 10 * F.l1_loss(shape, shapes[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.time() - started
    model.eval()
    test = torch.nonzero(held).squeeze(1)
    with torch.no_grad():
        outs = [model(images[test[s:s + 256]]) for s in range(0, len(test), 256)]
    predicted = {n: torch.cat([o[0][n].argmax(-1) for o in outs]) for n in CLASSES}
    shape_pred = torch.cat([o[1] for o in outs])
    levels = torch.from_numpy(data["background"])[test]
    report = {}
    for level_name, keep in [("all", torch.ones_like(levels, dtype=torch.bool))] + \
            [(b, levels == i) for i, b in enumerate(BACKGROUNDS)]:
        row = {n: round(float((predicted[n][keep] == classes[test][keep, i]).float().mean()), 3)
               for i, n in enumerate(CLASSES)}
        errors = (shape_pred[keep] - shapes[test][keep]).abs().mean(0)
        row.update({f"{n} MAE": round(float(e), 3) for n, e in zip(SHAPE_PARAMS, errors)})
        row["images"] = int(keep.sum())
        report[level_name] = row
    return {"train_seconds": round(seconds, 1), "test_images": len(test), "held_out": report}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--objects", type=int, default=600)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", help="write the results as JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = {}
    for resolution in args.resolutions:
        started = time.time()
        data = render_set(args.objects, args.views, resolution)
        rendered = time.time() - started
        results[resolution] = {"render_seconds": round(rendered, 1), **train_and_measure(data, args.steps)}
        print(json.dumps({resolution: results[resolution]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
