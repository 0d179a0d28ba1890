"""Find and validate object folders (views/, masks/, meta.json) before any training starts.

Layout, one folder per object:
    root/<object>/views/000.png ...   RGB images
    root/<object>/masks/000.png ...   object masks, matched to views by file stem
    root/<object>/meta.json           optional: category, per-view cameras and keypoints
A root that itself contains views/ is treated as a single object.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .dataset import ObjectViewsDataset, centre_crop_square, collate, resize_pair
from .images import MASK_RULES, load_mask, load_rgb, mask_array_from_pil, mask_rule, open_image
from .meta import CAMERA_KEYS, ViewMeta, read_meta
from .records import DataError, DataWarning, ObjectRecord, ViewRecord, data_error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DataWarning",
    "ObjectRecord",
    "ObjectViewsDataset",
    "ViewRecord",
    "collate",
    "load_mask",
    "load_rgb",
    "scan_objects",
]


def _list(folder: Path) -> list[Path]:
    """A folder's entries, sorted; a folder that cannot be read is a DataError naming it."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:     # PermissionError, a vanished network mount, ...
        raise data_error(folder, f"cannot read the folder ({error.strerror or type(error).__name__}); "
                                 "check its permissions") from error


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files in `folder` keyed by stem; two files with one stem would be ambiguous.
    Hidden files (.DS_Store) are skipped; any other file must be an image, so a stray file is
    reported rather than silently left out of training."""
    found: dict[str, Path] = {}
    for path in _list(folder):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            kind = "a folder" if path.is_dir() else "not an image"
            raise data_error(path, f"is {kind} ({', '.join(IMAGE_EXTENSIONS)}); move it out of {folder.name}/")
        if path.stem in found:
            raise data_error(
                path, f"has the same stem as {found[path.stem]}; which one is meant is ambiguous"
            )
        found[path.stem] = path
    return found


def _check_view_files(image_path: Path, mask_path: Path | None, resolution: int | None,
                      notes: list[str]) -> tuple[tuple[int, int], str | None]:
    """Decode the image (and mask) now, so a broken file fails the scan, not epoch 7; with
    `resolution`, check them as training will see them (centre square crop, resized).
    -> the image's (width, height) and the mask's reading rule. Appends warnings to `notes`."""
    image = load_rgb(image_path)  # [3,H,W]
    size = (image.shape[-1], image.shape[-2])
    if resolution is not None and min(size) < resolution:
        notes.append(f"{image_path}: {size[0]}x{size[1]} is upsampled to data.resolution {resolution}")
    if mask_path is None:
        return size, None
    opened = open_image(mask_path)
    rule = mask_rule(opened)
    mask = torch.from_numpy(mask_array_from_pil(opened).astype(np.float32))[None]  # [1,H,W]
    if mask.shape[-2:] != image.shape[-2:]:
        (mask_h, mask_w), (image_h, image_w) = mask.shape[-2:], image.shape[-2:]
        raise data_error(mask_path,
                         f"mask is {mask_w}x{mask_h} (WxH) but image {image_path} is {image_w}x{image_h}")
    if not mask.any():
        raise data_error(mask_path, "mask is empty (no pixel above half intensity)"
                         + (f"; read as a {MASK_RULES[rule]}" if rule else ""))
    if resolution is not None:
        # What training sees: the centre square, resized with the image (objectdata.dataset).
        # The mask alone (no image channels): the same filter per channel, so the same pixels.
        _, seen = resize_pair(*centre_crop_square(image[:0], mask, torch.zeros(0, 2))[:2], resolution)
        if not seen.any():
            raise data_error(mask_path, f"mask is empty at data.resolution {resolution} (the object covers "
                                        f"{int(mask.sum())} of {size[0]}x{size[1]} pixels, none left after the "
                                        "centre square crop and resize); crop the view around the object or raise data.resolution")
        if seen.all():
            notes.append(f"{mask_path}: the mask covers the whole {resolution}x{resolution} training view (inverted?)")
    return size, rule


def _check_keypoints(meta_path: Path, view_id: str, view: ViewMeta, image_path: Path, size: tuple[int, int]) -> None:
    """Keypoints are pixel coordinates of the view image; one outside it is a labelling error
    (e.g. coordinates of a larger original), not something to clamp silently."""
    width, height = size
    for index, point in enumerate(view.keypoints or []):
        if point is not None and not (0 <= point[0] <= width and 0 <= point[1] <= height):
            raise data_error(meta_path, f"views.{view_id}.keypoints[{index}] = {point} is outside the "
                                        f"{width}x{height} image {image_path} (pixel coordinates, x right, y down)")


def _check_requirements(meta_path: Path, view_id: str, view: ViewMeta,
                        require_cameras: bool, require_keypoints: bool) -> None:
    if require_cameras:
        missing = [key for key in CAMERA_KEYS if getattr(view, key) is None]
        if missing:
            lacks = f"views.{view_id} lacks {', '.join(missing)}"
            where = lacks if meta_path.exists() else "file is missing"
            raise data_error(meta_path, f"{where} (cameras required)")
    if require_keypoints and view.keypoints is None:
        where = "file is missing" if not meta_path.exists() else f"views.{view_id} lacks keypoints"
        raise data_error(meta_path, f"{where} (keypoints required)")


def scan_object(folder: Path, require_masks: bool = True, require_cameras: bool = False,
                require_keypoints: bool = False, resolution: int | None = None,
                notes: list[str] | None = None) -> ObjectRecord:
    """Validate one object folder and describe it (warnings appended to `notes`)."""
    notes = [] if notes is None else notes
    views_dir, masks_dir, meta_path = folder / "views", folder / "masks", folder / "meta.json"
    if not views_dir.is_dir():
        raise data_error(views_dir, "missing; every object folder needs a views/ folder of images")
    images = _images_by_stem(views_dir)
    if not images:
        raise data_error(views_dir, f"contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks = _images_by_stem(masks_dir) if masks_dir.is_dir() else {}
    for view_id, mask_path in masks.items():
        if view_id not in images:
            raise data_error(mask_path, f"has no matching view {views_dir / view_id}.* (masks pair with views by file name)")
    meta = read_meta(meta_path)
    for view_id in meta.views:
        if view_id not in images:
            raise data_error(meta_path, f"views.{view_id} has no image {views_dir / view_id}.*")

    views = []
    for view_id, image_path in images.items():
        mask_path = masks.get(view_id)
        if mask_path is None and require_masks:
            raise data_error(image_path,
                             f"has no mask (expected {masks_dir / view_id}.png or another image type)")
        size, rule = _check_view_files(image_path, mask_path, resolution, notes)
        view_meta = meta.views.get(view_id, ViewMeta())
        _check_keypoints(meta_path, view_id, view_meta, image_path, size)
        _check_requirements(meta_path, view_id, view_meta, require_cameras, require_keypoints)
        views.append(ViewRecord(
            image_path=image_path, mask_path=mask_path, azimuth=view_meta.azimuth,
            elevation=view_meta.elevation, distance=view_meta.distance,
            keypoints=view_meta.keypoints, view_id=view_id, mask_rule=rule,
        ))
    return ObjectRecord(name=folder.name, root=folder, category=meta.category, views=views,
                        keypoint_flip=meta.keypoint_flip, frame=meta.frame)


def scan_objects(root: Path | str, require_masks: bool = True, require_cameras: bool = False,
                 require_keypoints: bool = False, resolution: int | None = None) -> list[ObjectRecord]:
    """Validate every object folder under `root` (sorted by name); raise DataError on any problem.

    resolution: also check every view as training sees it (data.resolution): a mask that is
    empty there is an error; a mask covering the whole view, or a view smaller than the
    resolution, a DataWarning. Masks read by a special rule (a palette by index, 0/1 values)
    are reported in one DataWarning."""
    root = Path(root).expanduser()
    try:                   # a folder without search (x) permission fails on the first stat inside
        if not root.exists():
            raise data_error(root, "data folder does not exist")
        if not root.is_dir():
            raise data_error(root, "is not a folder")
        if (root / "views").is_dir():
            object_dirs = [root]  # the user pointed at a single object folder
        else:
            object_dirs = sorted((p for p in _list(root) if p.is_dir() and not p.name.startswith(".")),
                                 key=lambda p: p.name)
    except PermissionError as error:
        raise data_error(root, f"cannot read the folder ({error.strerror}); check its permissions") from error
    if not object_dirs:
        raise data_error(root, "contains no object folders (expected <object>/views/000.png, ...)")
    notes: list[str] = []
    records = [scan_object(folder, require_masks, require_cameras, require_keypoints, resolution, notes)
               for folder in object_dirs]
    relative = [r.name for r in records if r.frame == "relative"]
    if relative and any(v.has_camera for r in records if r.frame == "relative" for v in r.views):
        notes.append(f"{len(relative)} object(s) have a relative frame (meta.json frame, e.g. {relative[0]}): "
                     "their azimuth 0 is their own first view, so the pose word's cross-object terms "
                     "(same-camera consistency, contrast) leave them out")
    for rule, text in MASK_RULES.items():
        paths = [v.mask_path for r in records for v in r.views if v.mask_rule == rule]
        if paths:
            notes.insert(0, f"{len(paths)} mask(s) read as a {text} (e.g. {paths[0]})")
    if notes:
        more = f" (+{len(notes) - 5} more)" if len(notes) > 5 else ""
        warnings.warn(DataWarning(f"{root}: " + "; ".join(notes[:5]) + more), stacklevel=2)
    return records
