"""Validation grids: reference view | generated image | each token's attention overlaid."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw


def overlay(image: torch.Tensor, attn: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """image [3, H, W] in [0, 1], attn [h, w] -> [3, H, W]: the map (max-normalised, jet) on the image."""
    a = F.interpolate(attn[None, None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    a = (a / a.max().clamp(min=1e-12)).numpy()
    heat = torch.from_numpy(colormaps["jet"](a)[..., :3]).permute(2, 0, 1).float()
    return (1 - alpha) * image + alpha * heat


def attention_grid(references: torch.Tensor, images: torch.Tensor, maps: torch.Tensor | None,
                   token_names: list[str], prompts: list[str] | None = None) -> Image.Image:
    """references, images: [B, 3, H, W] in [0, 1]; maps: [B, C, h, w] or None. One row per sample."""
    rows = []
    for b in range(images.shape[0]):
        cells = [references[b], images[b]]
        if maps is not None:
            cells += [overlay(images[b], maps[b, c]) for c in range(maps.shape[1])]
        rows.append(torch.cat(cells, dim=-1))
    grid = torch.cat(rows, dim=-2).clamp(0, 1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    header = 14
    canvas = Image.new("RGB", (array.shape[1], array.shape[0] + header), "white")
    canvas.paste(Image.fromarray(array), (0, header))
    draw = ImageDraw.Draw(canvas)
    w = images.shape[-1]
    for i, label in enumerate(["reference", "sample"] + (token_names if maps is not None else [])):
        draw.text((i * w + 2, 1), label, fill="black")
    return canvas
