"""What every format reader returns: objects with views (image file, optional mask file, camera as
an OpenGL camera-to-world matrix in the source's world), before anything is written."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guided_concepts.objectdata.folder import IMAGE_EXTENSIONS
from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.cameras import CameraError, opengl_c2w


@dataclass
class SourceView:
    image: Path
    c2w: np.ndarray | None = None        # [4,4] OpenGL camera axes, source world; None: no camera
    mask: Path | None = None             # a separate mask file; else alpha, else the segmenter
    quality: float = 1.0                 # higher is better (CO3D: the mask's share of the image)
    origin: str = ""                     # where in the source this view came from, for meta.json


@dataclass
class SourceObject:
    name: str
    category: str
    frame: str                           # "canonical" (aligned across objects) or "relative"
    views: list[SourceView]
    world: str = "+y,+z"                 # UP,FRONT of the source world (canonical frames)
    notes: dict = field(default_factory=dict)


def existing_file(path: Path, where: str, extensions=IMAGE_EXTENSIONS) -> Path:
    """`path`, or `path` plus an image extension (NeRF's file_path has none): DataError naming
    `where` when neither exists."""
    path = Path(path)
    if path.is_file():
        return path
    for extension in extensions:
        if path.with_name(path.name + extension).is_file():
            return path.with_name(path.name + extension)
    raise data_error(where, f"frame file {path} does not exist")


def camera(where: str, matrix, axes: str, kind: str) -> np.ndarray:
    """opengl_c2w with its CameraError turned into a DataError naming `where`."""
    try:
        return opengl_c2w(matrix, axes, kind)
    except CameraError as error:
        raise data_error(where, str(error)) from None
    except (ValueError, TypeError):          # ragged, text, a dict: not a matrix of numbers
        raise data_error(where, f"the camera matrix is not a 4x4 or 3x4 array of numbers: {str(matrix)[:80]}") from None


def spread_views(views: list[SourceView], count: int) -> list[SourceView]:
    """`count` views spread around the object: farthest-point sampling on the cameras' directions
    from their mean point (or evenly along the sequence without cameras), best quality first."""
    if count <= 0 or len(views) <= count:
        return views
    if any(v.c2w is None for v in views):
        picks = np.linspace(0, len(views) - 1, count).round().astype(int)
        return [views[i] for i in picks]
    positions = np.stack([v.c2w[:3, 3] for v in views])
    directions = positions - positions.mean(axis=0)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True).clip(min=1e-12)
    chosen = [int(np.argmax([v.quality for v in views]))]
    nearest = np.full(len(views), np.inf)
    while len(chosen) < count:
        nearest = np.minimum(nearest, np.linalg.norm(directions - directions[chosen[-1]], axis=1))
        chosen.append(int(np.argmax(nearest)))
    return [views[i] for i in sorted(chosen)]
