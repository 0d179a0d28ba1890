"""Read and type-check an object's optional meta.json."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import data_error

DEFAULT_CATEGORY = "object"
CAMERA_KEYS = ("azimuth", "elevation", "distance")
CAMERA_RANGES = {"azimuth": (-360.0, 360.0), "elevation": (-90.0, 90.0)}
# Every key a meta.json may hold; any other is a typo (e.g. "categroy") that would otherwise be
# silently ignored. Read: category, views, keypoint_flip (and per view the camera and keypoints).
# Kept for reference, not read by training: keypoint_names and shape (what the project's own
# generators write, objectdata/synthetic.py and toyworld/world.py: sampled proportions, ToyWorld's
# ground truth), and "extra", free for the user's own notes (top level and per view).
# frame: "canonical" (default: one front shared by every object, as ShapeNet and ToyWorld) or
# "relative" (each object's azimuth 0 is its own, as in CO3D or a phone capture); source: what
# `python -m guided_concepts.prepare` read and how it normalised the cameras (kept for reference).
FRAMES = ("canonical", "relative")
TOP_LEVEL_KEYS = ("category", "frame", "views", "keypoint_flip", "keypoint_names", "shape", "source", "extra")
VIEW_KEYS = (*CAMERA_KEYS, "keypoints", "extra")


@dataclass(frozen=True)
class ViewMeta:
    azimuth: float | None = None
    elevation: float | None = None
    distance: float | None = None
    keypoints: list[list[float] | None] | None = None


@dataclass(frozen=True)
class ObjectMeta:
    category: str = DEFAULT_CATEGORY
    frame: str = FRAMES[0]
    views: dict[str, ViewMeta] = field(default_factory=dict)
    keypoint_flip: list[int] | None = None


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but `"azimuth": true` is surely a mistake.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(meta_path: Path, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise data_error(meta_path, f"{key} must be a finite number, got {value!r}")
    return float(value)


def _keypoints(meta_path: Path, key: str, value: Any) -> list[list[float] | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise data_error(meta_path, f"{key} must be a list of [x, y] pairs, got {value!r}")
    points: list[list[float] | None] = []
    for index, point in enumerate(value):
        if point is None:  # an annotated-as-unknown point keeps the semantic order intact
            points.append(None)
            continue
        if not (isinstance(point, list) and len(point) == 2 and all(map(_is_number, point))):
            raise data_error(meta_path, f"{key}[{index}] must be an [x, y] pair of numbers, got {point!r}")
        points.append([float(point[0]), float(point[1])])
    return points


def _check_keys(meta_path: Path, where: str, content: dict, valid: tuple[str, ...]) -> None:
    """DataError for the first key not in `valid`, with the nearest valid key when one is close."""
    for key in content:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise data_error(meta_path, f"{where}unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def camera_problem(camera: dict) -> str | None:
    """What is wrong with a camera of numbers or None ({"azimuth", "elevation", "distance"}), as
    "key must ..., got value", or None. Degrees: elevation past the poles is not a camera; azimuth
    wraps, but beyond one turn either way it is a unit or typing error (radians are within these
    bounds and cannot be told apart). Shared by meta.json's views and the pose word's --pose."""
    distance = camera.get("distance")
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        return f"distance must be a finite number > 0, got {distance:g}"
    for name, (lo, hi) in CAMERA_RANGES.items():
        value = camera.get(name)
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            return f"{name} must be in [{lo:g}, {hi:g}] degrees, got {value:g}"
    return None


def _view_meta(meta_path: Path, view_id: str, entry: Any) -> ViewMeta:
    key = f"views.{view_id}"
    if not isinstance(entry, dict):
        raise data_error(meta_path, f"{key} must be an object, got {entry!r}")
    _check_keys(meta_path, f"{key}: ", entry, VIEW_KEYS)
    camera = {name: _number(meta_path, f"{key}.{name}", entry.get(name)) for name in CAMERA_KEYS}
    problem = camera_problem(camera)
    if problem:
        raise data_error(meta_path, f"{key}.{problem}")
    keypoints = _keypoints(meta_path, f"{key}.keypoints", entry.get("keypoints"))
    return ViewMeta(keypoints=keypoints, **camera)


def _keypoint_flip(meta_path: Path, value: Any, views: dict[str, ViewMeta]) -> list[int] | None:
    if value is None:
        return None
    is_permutation = (
        isinstance(value, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        and sorted(value) == list(range(len(value)))
    )
    if not is_permutation:
        raise data_error(meta_path, f"keypoint_flip must be a permutation of 0..K-1, got {value!r}")
    for view_id, view in views.items():
        if view.keypoints is not None and len(view.keypoints) != len(value):
            raise data_error(
                meta_path,
                f"views.{view_id}.keypoints has {len(view.keypoints)} points "
                f"but keypoint_flip has {len(value)}",
            )
    return list(value)


def read_meta(meta_path: Path) -> ObjectMeta:
    """Parse meta.json; a missing file means defaults (category "object", no cameras)."""
    if not meta_path.exists():
        return ObjectMeta()
    try:
        content = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise data_error(meta_path, f"not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise data_error(meta_path, f"top level must be a JSON object, got {type(content).__name__}")
    _check_keys(meta_path, "", content, TOP_LEVEL_KEYS)

    category = content.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise data_error(meta_path, f"category must be a non-empty string, got {category!r}")

    frame = content.get("frame", FRAMES[0])
    if frame not in FRAMES:
        raise data_error(meta_path, f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")

    raw_views = content.get("views", {})
    if not isinstance(raw_views, dict):
        raise data_error(meta_path,
                         f"views must be an object keyed by view id, got {type(raw_views).__name__}")
    views = {view_id: _view_meta(meta_path, view_id, entry) for view_id, entry in raw_views.items()}

    keypoint_flip = _keypoint_flip(meta_path, content.get("keypoint_flip"), views)
    return ObjectMeta(category=category, frame=frame, views=views, keypoint_flip=keypoint_flip)
