"""CO3D (v2): SRC is a category folder with frame_annotations.jgz and sequence_annotations.jgz
(gzipped JSON lists); each sequence is one object. Cameras are PyTorch3D's (X_cam = X_world @ R + T,
x left, y up, looking along +z); image and mask paths are relative to the dataset root (SRC's
parent). A sequence circles its object in its own frame, so the frame is relative: the centre is
where the cameras look, up is their mean up, and azimuth 0 is the first chosen view.
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


def read(src: Path, options) -> list[SourceObject]:
    frames_file, sequences_file = src / "frame_annotations.jgz", src / "sequence_annotations.jgz"
    sequences = {s["sequence_name"]: s for s in load(sequences_file)}
    root = src.parent
    by_sequence: dict[str, list[SourceView]] = {}
    for index, frame in enumerate(load(frames_file)):
        where = f"{frames_file}: [{index}] ({frame.get('sequence_name')} frame {frame.get('frame_number')})"
        try:
            viewpoint, image_info = frame["viewpoint"], frame["image"]
            c2w = pytorch3d_c2w(viewpoint["R"], viewpoint["T"])
        except (KeyError, TypeError):
            raise data_error(where, "needs viewpoint.R, viewpoint.T and image.path") from None
        except (CameraError, ValueError) as error:
            raise data_error(where, f"viewpoint: {error}") from None
        image = existing_file(root / image_info["path"], where)
        mask_info = frame.get("mask") or {}
        mask = existing_file(root / mask_info["path"], where) if mask_info.get("path") else None
        height, width = image_info.get("size", (1, 1))
        share = float(mask_info.get("mass", height * width)) / max(1, height * width)
        if share < MIN_MASK_SHARE:
            continue
        by_sequence.setdefault(frame["sequence_name"], []).append(
            SourceView(image, c2w, mask, quality=share, origin=image_info["path"]))
    objects = []
    for name, views in by_sequence.items():
        info = sequences.get(name, {})
        score = info.get("viewpoint_quality_score")
        if options.min_quality is not None and (score is None or score < options.min_quality):
            continue
        objects.append(SourceObject(name, options.category or info.get("category", "object"), options.frame, views,
                                    notes={"viewpoint_quality_score": score}))
    if not objects:
        raise data_error(src, "no sequence is left (check --min-quality and the masks' mass)")
    return objects
