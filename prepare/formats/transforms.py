"""NeRF / Blender `transforms.json` (also nerfstudio's and instant-ngp's): frames with `file_path`
(relative to the json, extension optional) and `transform_matrix`, a 4x4 camera-to-world with OpenGL
axes. NeRF-synthetic's `transforms_train.json`, `_val`, `_test` of one scene are one object.
SRC is such a file, a folder holding them (one object), or a folder of such folders."""
from __future__ import annotations

import json
from pathlib import Path

from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.sources import SourceObject, SourceView, camera, existing_file

DEFAULTS = {"world": "+z,-y", "frame": "relative", "axes": "opengl"}
PATTERN = "transforms*.json"


def scenes(src: Path) -> list[list[Path]]:
    """SRC -> the transforms files of each scene (a folder's files are one scene)."""
    if src.is_file():
        return [[src]]
    if not src.is_dir():
        raise data_error(src, "does not exist")
    if sorted(src.glob(PATTERN)):
        return [sorted(src.glob(PATTERN))]
    found = [sorted(p.glob(PATTERN)) for p in sorted(src.iterdir()) if p.is_dir() and any(p.glob(PATTERN))]
    if not found:
        raise data_error(src, "no transforms.json (or transforms_train.json, ...) here or in its subfolders")
    return found


def frames_of(path: Path) -> list:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise data_error(path, f"not valid JSON ({error})") from None
    frames = content.get("frames") if isinstance(content, dict) else None
    if not isinstance(frames, list) or not frames:
        raise data_error(path, "has no frames (a list of {file_path, transform_matrix})")
    return frames


def read_scene(paths: list[Path], options) -> SourceObject:
    views = []
    for path in paths:
        for index, frame in enumerate(frames_of(path)):
            where = f"{path}: frames[{index}]"
            if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
                raise data_error(where, "needs file_path and transform_matrix")
            for key in ("file_path", "mask_path"):
                if key in frame and not isinstance(frame[key], str):
                    raise data_error(where, f"{key} must be a path string, got {frame[key]!r}")
            image = existing_file(path.parent / frame["file_path"], where)
            mask = existing_file(path.parent / frame["mask_path"], where) if frame.get("mask_path") else None
            views.append(SourceView(image, camera(where, frame["transform_matrix"], options.axes, "c2w"), mask,
                                    origin=f"{path.name}: {frame['file_path']}" if len(paths) > 1 else frame["file_path"]))
    return SourceObject(paths[0].resolve().parent.name, options.category, options.frame, views, world=options.world)


def read(src: Path, options) -> list[SourceObject]:
    return [read_scene(paths, options) for paths in scenes(src)]
