"""Decode view images and masks of any common PIL mode into float tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .records import data_error

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535.0
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(path: Path | str) -> Image.Image:
    """Fully decode an image file as a viewer shows it (EXIF orientation applied), raising
    DataError naming the file if that fails.

    Image.verify() only checks headers/CRCs; a truncated file is caught only by decoding it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            # A phone's JPEG stores its pixels sideways with an Orientation tag; a mask drawn on
            # the upright image only matches once the tag is applied. exif_transpose copies, so
            # the pixels outlive the file (closed after the `with`).
            return ImageOps.exif_transpose(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... per format
        raise data_error(path, f"cannot read image ({type(error).__name__}: {error})") from error


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def rgb_array_from_pil(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 [H,W,3] in [0,1]; transparency is composited over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit grey: scale by the full 16-bit range (convert("RGB") would clip at 255).
        grey = np.asarray(image, dtype=np.float32) / SIXTEEN_BIT_MAX
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)  # over a white background
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


VOID_INDEX = 255      # palette masks: VOC's "void"/ignore border (read as background)
MASK_RULES = {
    "palette": "palette mask read by index (entry 0 black): 0 background, 255 void (background), any other index the object",
    "zero_one": "mask stored as 0/1 values: every non-zero pixel is the object",
}


def mask_rule(image: Image.Image) -> str | None:
    """Which non-standard rule reads this mask (a MASK_RULES key), or None for a plain mask
    thresholded at half its range."""
    if image.mode == "P" and not _has_alpha(image) and not _grey_palette(image) and _black_background(image):
        return "palette"
    if image.mode in ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I", "RGB") and not _has_alpha(image):
        values = np.asarray(image if image.mode != "RGB" and image.mode != "P" else image.convert("L"))
        if values.size and int(values.max()) == 1:
            return "zero_one"
    return None


def _black_background(image: Image.Image) -> bool:
    """Label masks (VOC and the like) keep index 0 black for the background; a palette image whose
    entry 0 is a colour (an adaptive palette of a drawn mask) is read by brightness instead."""
    palette = image.getpalette() or []
    return len(palette) >= 3 and palette[:3] == [0, 0, 0]


def _grey_palette(image: Image.Image) -> bool:
    """A palette whose used colours are all grey (e.g. an L mask saved as P): read by brightness."""
    palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(image))
    used = used[used < len(palette)]
    colours = palette[used]
    return bool(len(colours)) and bool((colours == colours[:, :1]).all())


def mask_array_from_pil(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> bool [H,W]: thresholded at half of the mode's value range, except a
    palette (P) mask with coloured entries, read by index (see MASK_RULES), and a 0/1 mask."""
    rule = mask_rule(image)
    if rule == "palette":
        index = np.asarray(image)
        return (index != 0) & (index != VOID_INDEX)
    if rule == "zero_one":
        grey = image if image.mode not in ("RGB", "P") else image.convert("L")
        return np.asarray(grey) > 0
    if image.mode == "1":
        return np.asarray(image, dtype=bool)
    if image.mode in SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) > SIXTEEN_BIT_MAX / 2
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32) > 0.5
    if _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        # A constant alpha (e.g. an opaque RGBA save of a black/white mask) carries no
        # shape; then the mask lives in the colour channels instead.
        if alpha.min() != alpha.max():
            return alpha > 127.5
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.float32) > 127.5


def load_rgb(path: Path | str) -> torch.Tensor:
    """Image file -> float tensor [3,H,W] in [0,1]."""
    array = rgb_array_from_pil(open_image(path))  # [H,W,3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_mask(path: Path | str) -> torch.Tensor:
    """Mask file -> float tensor [1,H,W] with values in {0,1}."""
    mask = mask_array_from_pil(open_image(path))  # [H,W] bool
    return torch.from_numpy(mask.astype(np.float32))[None]
