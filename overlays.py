"""Validation grids: each token's cross-attention overlaid on the reference view and on samples."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw

MIN_TILE = 64


def overlay(image: torch.Tensor, attn: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """image [3, H, W] in [0, 1], attn [h, w] -> [3, H, W]: the map (max-normalised, jet) on the image."""
    a = F.interpolate(attn[None, None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    a = (a / a.max().clamp(min=1e-12)).numpy()
    heat = torch.from_numpy(colormaps["jet"](a)[..., :3]).permute(2, 0, 1).float()
    return (1 - alpha) * image + alpha * heat


def columns_with_overlays(images: torch.Tensor, maps: torch.Tensor | None, label: str,
                          token_names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """images [B, 3, H, W], maps [B, C, h, w] -> [(label, [B, 3, H, W]), ...]: the images, then one
    overlay column per token."""
    cols = [(label, images)]
    if maps is not None:
        for c, name in enumerate(token_names):
            cols.append((f"{name}", torch.stack([overlay(images[b], maps[b, c]) for b in range(len(images))])))
    return cols


def image_grid(columns: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """columns: (header, [B, 3, H, W] in [0, 1]) side by side, one row per sample. Tiles below
    MIN_TILE pixels are upscaled (nearest) so 32 px samples and their labels stay readable."""
    size = columns[0][1].shape[-1]
    if size < MIN_TILE:
        factor = -(-MIN_TILE // size)
        columns = [(label, F.interpolate(images.float(), scale_factor=factor, mode="nearest")) for label, images in columns]
    grid = torch.cat([torch.cat(list(images), dim=-2) for _, images in columns], dim=-1).clamp(0, 1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    header = 14
    canvas = Image.new("RGB", (array.shape[1], array.shape[0] + header), "white")
    canvas.paste(Image.fromarray(array), (0, header))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, images in columns:
        draw.text((x + 2, 1), label, fill="black")
        x += images.shape[-1]
    return canvas


def attention_grid(references: torch.Tensor, images: torch.Tensor, maps: torch.Tensor | None,
                   token_names: list[str], reference_maps: torch.Tensor | None = None) -> Image.Image:
    """reference | its attention at low noise (if given) | sample | attention while sampling.

    references, images: [B, 3, H, W] in [0, 1]; maps, reference_maps: [B, C, h, w] or None.
    """
    cols = columns_with_overlays(references, reference_maps, "reference", [f"{n} t=100" for n in token_names])
    cols += columns_with_overlays(images, maps, "sample", token_names)
    return image_grid(cols)
