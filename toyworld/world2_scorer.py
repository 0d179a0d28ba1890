"""ToyWorld 2's scorer: a small CNN that reads category, colour, viewing direction and
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from guided_concepts.toyworld.scorer import Scorer, augment, load_weights, mask_iou, save_weights
from guided_concepts.toyworld.world import COLOURS, DIRECTIONS
from guided_concepts.toyworld.world2 import BACKGROUNDS, CATEGORIES, SHAPE_PARAMS
from guided_concepts.toyworld.world2_pretraining import render_set

CLASSES = {"category": len(CATEGORIES), "colour": len(COLOURS), "direction": len(DIRECTIONS)}


class Scorer2(nn.Module):
    """images [B,3,H,W] in [0,1] at `size` -> class logits per CLASSES name, shape [B,6] in [0,1] and
    the object's mask logits [B,1,size,size]. ToyWorld 1's scorer trunk and class heads, read at
    `size` instead of 32 px, plus a shape head and a mask head (on a floor or among blocks,
    "not white" is no silhouette)."""

    def __init__(self, size: int, width: int = 32):
        super().__init__()
        self.size, self.width = size, width
        self.trunk = Scorer(width, CLASSES)                    # .features [B, 16 * width], .heads per class
        # The shape head reads the whole last feature map, not its 2x2 average: the trunk's
        # GroupNorm divides out how much of the image the object fills, so pooled features read
        # width and depth at chance (MAE 0.20 against 0.25) while the map still shows the extent.
        cells = (size // 8) ** 2
        self.shape = nn.Sequential(nn.Conv2d(4 * width, 16, 1), nn.SiLU(), nn.Flatten(),
                                   nn.Linear(16 * cells, 128), nn.SiLU(), nn.Linear(128, len(SHAPE_PARAMS)))
        self.mask = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in (width, 2 * width, 4 * width))   # per trunk block

    def forward(self, images: torch.Tensor):
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        maps, mask = x * 2 - 1, 0
        for block, head in zip(self.trunk.features[:3], self.mask):   # [B, w, s/2], [B, 2w, s/4], [B, 4w, s/8]
            maps = block(maps)
            mask = mask + F.interpolate(head(maps), size=(self.size, self.size), mode="bilinear", align_corners=False)
        features = self.trunk.features[3:](maps)               # [B, 16 * width]
        return ({n: head(features) for n, head in self.trunk.heads.items()}, torch.sigmoid(self.shape(maps)),
                mask)                                          # ..., [B, 6], [B, 1, size, size]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] in [0,1] -> category, colour, direction class indices [B]; shape [B,6];
        mask bool [B,H,W] (the object's pixels, at the images' size)."""
        encoded = [self(images[s:s + batch]) for s in range(0, len(images), batch)]
        predicted = {n: torch.cat([o[0][n].argmax(-1) for o in encoded]) for n in CLASSES}
        predicted["shape"] = torch.cat([o[1] for o in encoded])
        mask = torch.cat([o[2] for o in encoded])
        predicted["mask"] = F.interpolate(mask, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0
        return predicted


def train_and_measure(data: dict, steps: int, batch: int = 96, seed: int = 0, progress=None):
    """Train on 90% of the objects, measure on the rest: per background level and overall.
    -> (scorer, report)."""
    torch.manual_seed(seed)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(data["masks"])[:, None].float()                       # [N,1,H,W]
    classes, shapes = torch.from_numpy(data["classes"]), torch.from_numpy(data["shape"])
    held = torch.from_numpy(data["object"] % 10 == 9)
    model = Scorer2(images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    train_index = torch.nonzero(~held).squeeze(1)
    started = time.time()
    for _ in (progress or (lambda r: r))(range(steps)):
        index = train_index[torch.randint(0, len(train_index), (batch,), generator=generator)]
        seen = augment(torch.cat([images[index], masks[index]], 1), generator)     # the mask moves with the image
        logits, shape, mask = model(seen[:, :3])
        loss = sum(F.cross_entropy(logits[n], classes[index, i]) for i, n in enumerate(CLASSES))
        loss = loss + 10 * F.l1_loss(shape, shapes[index])
        loss = loss + F.binary_cross_entropy_with_logits(mask, (seen[:, 3:] > 0.5).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.time() - started
    model.eval()
    test = torch.nonzero(held).squeeze(1)
    predicted = model.predict(images[test])
    shape_pred = predicted["shape"]
    levels = torch.from_numpy(data["background"])[test]
    report = {}
    for level_name, keep in [("all", torch.ones_like(levels, dtype=torch.bool))] + \
            [(b, levels == i) for i, b in enumerate(BACKGROUNDS)]:
        row = {n: round(float((predicted[n][keep] == classes[test][keep, i]).float().mean()), 3)
               for i, n in enumerate(CLASSES)}
        errors = (shape_pred[keep] - shapes[test][keep]).abs().mean(0)
        row.update({f"{n} MAE": round(float(e), 3) for n, e in zip(SHAPE_PARAMS, errors)})
        row["silhouette IoU"] = round(float(mask_iou(predicted["mask"][keep], masks[test][keep, 0] > 0.5).mean()), 3)
        row["images"] = int(keep.sum())
        report[level_name] = row
    return model, {"train_seconds": round(seconds, 1), "test_images": len(test), "held_out": report}


def save_scorer2(model: Scorer2, folder: Path) -> None:
    save_weights(model, folder, {"world": "toyworld2", "size": model.size, "width": model.width})


def load_scorer2(folder: str | Path) -> Scorer2:
    return load_weights(folder, lambda c: Scorer2(c["size"], c["width"]), "a ToyWorld 2 model")


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
        data = render_set(args.objects, args.views, resolution, seed=0, held_out=None)
        rendered = time.time() - started
        results[resolution] = {"render_seconds": round(rendered, 1), **train_and_measure(data, args.steps)[1]}
        print(json.dumps({resolution: results[resolution]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
