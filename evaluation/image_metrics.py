"""Metrics on generated images: pure functions on tensors, pluggable features and segmenters."""
from __future__ import annotations

import importlib
import itertools
from typing import Callable

import torch
import torch.nn.functional as F


# -- silhouettes --------------------------------------------------------------------------------
def segment_plain_background(images: torch.Tensor, threshold: float = 0.12) -> torch.Tensor:
    """Default segmenter for plain-background renders: a pixel is object when its colour differs
    from the background (the median colour of the image border) by more than `threshold`.

    images [B, 3, H, W] in [0, 1] -> masks [B, 1, H, W] in {0, 1}.
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]                # [B, 3, 1, 1]
    distance = (images - background).abs().amax(dim=1, keepdim=True)
    return (distance > threshold).float()


def centroid_align(masks: torch.Tensor) -> torch.Tensor:
    """Move each mask's centroid to the image centre (whole-pixel shift; the seeds' protocol).
    Empty masks stay empty.  [B, 1, H, W] -> [B, 1, H, W]"""
    out = torch.zeros_like(masks)
    h, w = masks.shape[-2:]
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    for b in range(masks.shape[0]):
        m = masks[b, 0].float()
        total = m.sum()
        if total == 0:
            continue
        cy, cx = (m.sum(1) * ys).sum() / total, (m.sum(0) * xs).sum() / total
        dy, dx = int(round((h - 1) / 2 - cy.item())), int(round((w - 1) / 2 - cx.item()))
        shifted = torch.zeros_like(m)
        src = m[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        out[b, 0] = shifted
    return out


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks [B, 1, H, W] -> [B]; two empty masks count as 0."""
    a, b = a > 0.5, b > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def silhouette_iou(generated: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shape fidelity of generated silhouettes against a reference object's masks.

    generated [B, 1, H, W]; references [V, 1, H', W'] (view 0 is the reference view).
    Returns "centroid_iou" [B] (against view 0, both centroid-aligned) and "max_view_iou" [B]
    (the best centroid-aligned IoU over the reference's views).
    """
    refs = F.interpolate(references.float(), size=generated.shape[-2:], mode="nearest")
    gen = centroid_align(generated)
    refs = centroid_align(refs)
    per_view = torch.stack([mask_iou(gen, refs[v:v + 1].expand_as(gen)) for v in range(len(refs))], dim=1)  # [B, V]
    return {"centroid_iou": per_view[:, 0], "max_view_iou": per_view.max(dim=1).values}


# -- features, diversity, token consistency -------------------------------------------------------
def pixel_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Default offline image features: the image at size x size, flattened, unit norm.
    [B, 3, H, W] -> [B, 3 * size * size]"""
    small = F.interpolate(images.float(), size=(size, size), mode="area")
    return F.normalize(small.flatten(1), dim=1)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean L2 distance over all pairs of rows of [N, F] (0 for N < 2)."""
    if len(features) < 2:
        return 0.0
    pairs = [(features[i] - features[j]).norm().item() for i, j in itertools.combinations(range(len(features)), 2)]
    return sum(pairs) / len(pairs)


def inspiration_tree_scores(features: dict[str, torch.Tensor]) -> dict[str, float]:
    """Inspiration-Tree style token scores from each token's samples' features [N, F]:
    consistency/<t> = mean cosine similarity among t's own samples (a token that means one thing
    is consistent); distinctness/<a>|<b> = 1 - mean cosine similarity between a's and b's samples.
    """
    normed = {t: F.normalize(f.float(), dim=1) for t, f in features.items()}
    out = {}
    for t, f in normed.items():
        sim = f @ f.T
        n = len(f)
        out[f"consistency/{t}"] = ((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)).item()
    for a, b in itertools.combinations(sorted(normed), 2):
        out[f"distinctness/{a}|{b}"] = 1 - (normed[a] @ normed[b].T).mean().item()
    return out


# -- plug-ins --------------------------------------------------------------------------------
def load_callable(spec: str | None, default: Callable) -> Callable:
    """'package.module:function' -> that function; None -> default. Lets users plug in their own
    segmenter (images -> masks) or feature extractor (images -> [N, F])."""
    if not spec:
        return default
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{spec!r}: cannot load it ({type(err).__name__}: {err})") from err


class ClipScorer:
    """CLIP text-image similarity (editability, CLIP-T), when a CLIP model is given by path or hub
    id. `available` is False, with `reason`, when none is given or it cannot be loaded."""

    def __init__(self, model: str | None):
        self.available, self.reason = False, "no CLIP model given (--clip PATH_OR_HUB_ID)"
        if not model:
            return
        try:
            from transformers import CLIPModel, CLIPProcessor
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
            self.available, self.reason = True, ""
        except Exception as err:   # a missing optional model is reported, not fatal
            self.reason = f"CLIP model {model!r} could not be loaded: {type(err).__name__}: {err}"

    @torch.no_grad()
    def text_image(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], one text each -> cosine similarity [B]."""
        pil = [(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8") for img in images]
        inputs = self.processor(text=texts, images=pil, return_tensors="pt", padding=True)
        out = self.model(**inputs)
        return F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
