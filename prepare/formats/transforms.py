"""NeRF / Blender `transforms.json` (also nerfstudio's and instant-ngp's): frames with `file_path`
(relative to the json, extension optional) and `transform_matrix`, a 4x4 camera-to-world with OpenGL
axes. SRC is a transforms.json, a folder holding one (one object), or a folder of such folders."""
from __future__ import annotations

import json
from pathlib import Path

from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.sources import SourceObject, SourceView, camera, existing_file

DEFAULTS = {"world": "+z,-y", "frame": "relative", "axes": "opengl"}
NAME = "transforms.json"


def files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if (src / NAME).is_file():
        return [src / NAME]
    found = sorted(p / NAME for p in src.iterdir() if (p / NAME).is_file()) if src.is_dir() else []
    if not found:
        raise data_error(src, f"no {NAME} here or in its subfolders")
    return found


def read_one(path: Path, options) -> SourceObject:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise data_error(path, f"not valid JSON ({error})") from None
    frames = content.get("frames") if isinstance(content, dict) else None
    if not isinstance(frames, list) or not frames:
        raise data_error(path, "has no frames (a list of {file_path, transform_matrix})")
    views = []
    for index, frame in enumerate(frames):
        where = f"{path}: frames[{index}]"
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise data_error(where, "needs file_path and transform_matrix")
        image = existing_file(path.parent / frame["file_path"], where)
        mask = existing_file(path.parent / frame["mask_path"], where) if frame.get("mask_path") else None
        views.append(SourceView(image, camera(where, frame["transform_matrix"], options.axes, "c2w"), mask,
                                origin=str(frame["file_path"])))
    name = path.parent.name if path.parent.name else "object"
    return SourceObject(name, options.category, options.frame, views, world=options.world)


def read(src: Path, options) -> list[SourceObject]:
    return [read_one(path, options) for path in files(src)]
