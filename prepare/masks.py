"""Object masks for views that bring none: the image's alpha when it has one, else a segmenter.

    threshold     pixels far from the border's colour (renders, photos on a plain background)
    grabcut       OpenCV's GrabCut from the threshold mask's box (pip install opencv-python-headless)
    hf:FOLDER     transformers' image-segmentation pipeline with the user's weights
    sam:FOLDER    transformers' SamModel, prompted with the threshold mask's box
Each returns a bool [H,W] array; the name goes into meta.json as mask_source.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

THRESHOLD = 0.05          # least colour distance from the background (RGB in [0,1], Euclidean / sqrt 3)
SEGMENTERS = ("threshold", "grabcut", "hf:FOLDER", "sam:FOLDER")


def split_alpha(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """-> (RGB on white, alpha mask or None). An alpha that is all opaque is no mask."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB"), alpha >= 128
    return image.convert("RGB"), None


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that best splits `values` (in [0,1]) into two classes (Otsu's method)."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    between = (total_mean * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(edges[1:][np.argmax(between)])


def threshold_mask(image: Image.Image, threshold: float | None = None) -> np.ndarray:
    """Pixels whose colour is over `threshold` from the border's median colour (default: Otsu's
    split of the distances, at least THRESHOLD, so an edge pixel counts when it is mostly object),
    speckles opened away (a 1/128-of-the-image filter, none under 256 px, where it would cut thin
    legs). Holes are kept: the gaps of a chair's back are background."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255                 # [H,W,3]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) / np.sqrt(3)
    if threshold is None:
        threshold = max(THRESHOLD, otsu(distance))
    mask = Image.fromarray((distance > threshold).astype(np.uint8) * 255, "L")
    size = 2 * (min(mask.size) // 256) + 1
    if size >= 3:
        mask = mask.filter(ImageFilter.MinFilter(size)).filter(ImageFilter.MaxFilter(size))
    return np.asarray(mask) > 0


def box_of(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the mask, `margin` of the image wider; the whole image if empty."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, w, h
    mx, my = int(margin * w), int(margin * h)
    return max(0, xs.min() - mx), max(0, ys.min() - my), min(w, xs.max() + 1 + mx), min(h, ys.max() + 1 + my)


def grabcut_mask(image: Image.Image, iterations: int = 5) -> np.ndarray:
    """OpenCV's GrabCut started from the threshold mask: outside its box (at least a 5% frame)
    is background, the threshold mask probable object, the rest of the box probable background."""
    try:
        import cv2
    except ImportError:
        raise ImportError("--segmenter grabcut needs OpenCV: pip install opencv-python-headless") from None
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    start = threshold_mask(image)
    x0, y0, x1, y1 = box_of(start)
    fx, fy = max(1, w // 20), max(1, h // 20)
    x0, y0, x1, y1 = max(x0, fx), max(y0, fy), min(x1, w - fx), min(y1, h - fy)
    labels = np.full((h, w), cv2.GC_BGD, np.uint8)
    labels[y0:y1, x0:x1] = np.where(start[y0:y1, x0:x1], cv2.GC_PR_FGD, cv2.GC_PR_BGD)
    if not (labels == cv2.GC_PR_FGD).any():
        return start
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(rgb[..., ::-1].copy(), labels, None, background, foreground, iterations, cv2.GC_INIT_WITH_MASK)
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


class PipelineSegmenter:
    """transformers' image-segmentation pipeline; of its segments, the one most inside the central
    half of the image and least on its border is the object."""

    def __init__(self, folder: str):
        from transformers import pipeline
        self.pipe = pipeline("image-segmentation", model=folder, device="cpu")

    def __call__(self, image: Image.Image) -> np.ndarray:
        segments = self.pipe(image)
        if not segments:
            return np.zeros((image.height, image.width), bool)
        h, w = image.height, image.width
        centre = np.zeros((h, w), bool)
        centre[h // 4:3 * h // 4, w // 4:3 * w // 4] = True
        border = ~np.pad(np.ones((h - 2, w - 2), bool), 1)

        def score(mask: np.ndarray) -> float:
            return float((mask & centre).mean() - (mask & border).sum() / border.sum())
        masks = [np.asarray(s["mask"].resize((w, h))) > 127 for s in segments]
        return max(masks, key=score)


class SamSegmenter:
    """transformers' SamModel with the threshold mask's box as the prompt; the mask SAM scores best."""

    def __init__(self, folder: str):
        import torch
        from transformers import SamModel, SamProcessor
        self.torch = torch
        self.model = SamModel.from_pretrained(folder).eval()
        self.processor = SamProcessor.from_pretrained(folder)

    def __call__(self, image: Image.Image) -> np.ndarray:
        box = [float(v) for v in box_of(threshold_mask(image))]
        inputs = self.processor(images=image.convert("RGB"), input_boxes=[[box]], return_tensors="pt")
        with self.torch.no_grad():
            out = self.model(**inputs)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]   # [1,3,H,W]
        best = int(out.iou_scores[0, 0].argmax())
        return masks[0, best].numpy().astype(bool)


def check_segmenter(name: str) -> None:
    """ValueError for a name segmenter() would refuse, without loading anything."""
    kind, _, folder = name.partition(":")
    if name in ("threshold", "grabcut"):
        return
    if kind in ("hf", "sam") and folder:
        if not Path(folder).is_dir():
            raise ValueError(f"--segmenter {name}: {folder} is not a model folder")
        return
    raise ValueError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {name!r}")


def segmenter(name: str):
    """A segmenter by name (SEGMENTERS) -> callable(PIL image) -> bool [H,W]."""
    check_segmenter(name)
    if name == "threshold":
        return threshold_mask
    if name == "grabcut":
        return grabcut_mask
    kind, _, folder = name.partition(":")
    return PipelineSegmenter(folder) if kind == "hf" else SamSegmenter(folder)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
