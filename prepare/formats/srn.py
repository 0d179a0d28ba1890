"""SRN ShapeNet renders (srn_chairs, srn_cars): per object rgb/NNNNNN.png and pose/NNNNNN.txt, 16
numbers of a 4x4 camera-to-world with OpenCV axes, in ShapeNet's aligned frame, so the frame is
canonical: the same azimuth is the same side of every object. World: y up, fronts towards +z
by default (`--world` if your copy differs: check the contact sheet's azimuth-0 views).
SRC is one object folder or a folder of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.sources import SourceObject, SourceView, camera

DEFAULTS = {"world": "+y,+z", "frame": "canonical", "axes": "opencv"}


def folders(src: Path) -> list[Path]:
    if (src / "pose").is_dir():
        return [src]
    found = sorted(p for p in src.iterdir() if (p / "pose").is_dir()) if src.is_dir() else []
    if not found:
        raise data_error(src, "no pose/ folder here or in its subfolders (SRN layout: rgb/, pose/)")
    return found


def read_one(folder: Path, options) -> SourceObject:
    views = []
    for pose in sorted((folder / "pose").glob("*.txt")):
        image = folder / "rgb" / f"{pose.stem}.png"
        if not image.is_file():
            raise data_error(pose, f"frame file {image} does not exist")
        try:
            numbers = np.array(pose.read_text().split(), dtype=np.float64)
        except ValueError:
            raise data_error(pose, "is not 16 numbers") from None
        if numbers.size not in (12, 16):
            raise data_error(pose, f"a camera matrix must be 4x4 or 3x4, got {numbers.size} numbers")
        views.append(SourceView(image, camera(str(pose), numbers.reshape(-1, 4), options.axes, "c2w"),
                                origin=f"rgb/{image.name}"))
    if not views:
        raise data_error(folder / "pose", "has no NNNNNN.txt cameras")
    return SourceObject(folder.name, options.category, options.frame, views, world=options.world)


def read(src: Path, options) -> list[SourceObject]:
    return [read_one(folder, options) for folder in folders(src)]
