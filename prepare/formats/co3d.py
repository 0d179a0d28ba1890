"""CO3D (v2): SRC is a category folder with frame_annotations.jgz and sequence_annotations.jgz
(gzipped JSON lists); each sequence is one object. Cameras are PyTorch3D's (X_cam = X_world @ R + T,
x left, y up, looking along +z); image and mask paths are relative to the dataset root (SRC's
parent). A sequence circles its object in its own frame, so the frame is relative: the centre is
where the cameras look, up is read from the cameras (cameras.estimate_up), azimuth 0 is the first
chosen view.
Quality: sequences under `--min-quality` (viewpoint_quality_score) are skipped; frames whose mask
covers under 1% of the image are never chosen."""
from __future__ import annotations

import gzip
import json
from pathlib import Path


from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.cameras import CameraError, pytorch3d_c2w
from guided_concepts.prepare.sources import SourceObject, SourceView, existing_file

DEFAULTS = {"world": "+y,+z", "frame": "relative", "axes": "pytorch3d"}
MIN_MASK_SHARE = 0.01


def load(path: Path) -> list:
    if not path.is_file():
        raise data_error(path, "does not exist (a CO3D category folder has frame_ and sequence_annotations.jgz)")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise data_error(path, f"not gzipped JSON ({error})") from None
    if not isinstance(content, list):
        raise data_error(path, "must hold a list of annotations")
    return content


def field(where: str, record, *keys, kind=None):
    """record[keys[0]][keys[1]]...; DataError naming `where` and the key path when it is missing
    or not of `kind`."""
    value = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise data_error(where, f"needs {'.'.join(keys)}")
        value = value[key]
    if kind is not None and not isinstance(value, kind):
        raise data_error(where, f"{'.'.join(keys)} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def read(src: Path, options) -> list[SourceObject]:
    frames_file, sequences_file = src / "frame_annotations.jgz", src / "sequence_annotations.jgz"
    sequences = {}
    for index, entry in enumerate(load(sequences_file)):
        sequences[field(f"{sequences_file}: [{index}]", entry, "sequence_name", kind=str)] = entry
    root = src.parent
    by_sequence: dict[str, list[SourceView]] = {}
    for index, frame in enumerate(load(frames_file)):
        where = f"{frames_file}: [{index}]"
        name = field(where, frame, "sequence_name", kind=str)     # write.safe_name checks it as a folder name
        image_path = field(where, frame, "image", "path", kind=str)
        try:
            c2w = pytorch3d_c2w(field(where, frame, "viewpoint", "R"), field(where, frame, "viewpoint", "T"))
        except (CameraError, ValueError, TypeError) as error:
            raise data_error(where, f"viewpoint: {error}") from None
        image = existing_file(root / image_path, where)
        mask_info = frame.get("mask") or {}
        if not isinstance(mask_info, dict):
            raise data_error(where, f"mask must be an object, got {mask_info!r}")
        mask = existing_file(root / field(where, mask_info, "path", kind=str), where) if mask_info.get("path") else None
        size = frame["image"].get("size") or [1, 1]
        mass = mask_info.get("mass")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size)):
            raise data_error(where, f"image.size must be [height, width], got {size!r}")
        if mass is not None and not isinstance(mass, (int, float)):
            raise data_error(where, f"mask.mass must be a number, got {mass!r}")
        share = float(mass) / max(1.0, size[0] * size[1]) if mass is not None else 1.0
        if share < MIN_MASK_SHARE:
            continue
        by_sequence.setdefault(name, []).append(SourceView(image, c2w, mask, quality=share, origin=image_path))
    objects = []
    for name, views in by_sequence.items():
        info = sequences.get(name, {})
        score = info.get("viewpoint_quality_score")
        if options.min_quality is not None:
            if not isinstance(score, (int, float)) or score < options.min_quality:
                continue
        category = options.category or info.get("category") or "object"
        objects.append(SourceObject(name, str(category), options.frame, views, notes={"viewpoint_quality_score": score}))
    if not objects:
        raise data_error(src, "no sequence is left (check --min-quality and the masks' mass)")
    return objects
