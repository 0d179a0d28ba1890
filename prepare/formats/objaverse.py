"""Zero123 / Objaverse render folders: per object, NNN.png (RGBA: alpha is the mask) and NNN.npy, a
3x4 world-to-camera matrix. Zero123's Blender script leaves Blender's camera axes (OpenGL) in the
matrix and renders a z-up world; `--camera-axes opencv` reads renders written for OpenCV.
SRC is one such folder or a folder of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.sources import SourceObject, SourceView, camera

DEFAULTS = {"world": "+z,-y", "frame": "relative", "axes": "opengl"}


def folders(src: Path) -> list[Path]:
    if not src.is_dir():
        raise data_error(src, "is not a folder of NNN.png + NNN.npy renders")
    if any(src.glob("*.npy")):
        return [src]
    found = sorted(p for p in src.iterdir() if p.is_dir() and any(p.glob("*.npy")))
    if not found:
        raise data_error(src, "no NNN.npy cameras here or in its subfolders")
    return found


def read_one(folder: Path, options) -> SourceObject:
    views = []
    for matrix_path in sorted(folder.glob("*.npy")):
        image = matrix_path.with_suffix(".png")
        if not image.is_file():
            raise data_error(matrix_path, f"frame file {image.name} does not exist")
        try:
            matrix = np.load(matrix_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise data_error(matrix_path, f"not a readable .npy matrix ({error})") from None
        views.append(SourceView(image, camera(str(matrix_path), matrix, options.axes, "w2c"), origin=image.name))
    return SourceObject(folder.name, options.category, options.frame, views, world=options.world)


def read(src: Path, options) -> list[SourceObject]:
    return [read_one(folder, options) for folder in folders(src)]
