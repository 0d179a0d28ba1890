"""Decode view images and masks of any common PIL mode into float tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .records import data_error

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535.0
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(path: Path | str) -> Image.Image:
    """Fully decode an image file, raising DataError naming the file if that fails.

    Image.verify() only checks headers/CRCs; a truncated file is caught only by decoding it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            # copy(): closing the file after the `with` would otherwise invalidate the pixels.
            return image.copy()
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


def mask_array_from_pil(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> bool [H,W], thresholded at half of the mode's value range."""
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
