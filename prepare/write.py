"""From a reader's objects to object folders: choose views, convert cameras, take masks, then write
everything in one atomic rename (a failure leaves OUT as it was)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from guided_concepts.checkpointing import atomic_folder
from guided_concepts.objectdata.images import open_image
from guided_concepts.objectdata.meta import DEFAULT_CATEGORY
from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare import masks as masking
from guided_concepts.prepare.cameras import (CameraError, nearest_point_to_axes, orbit, relative_frame, to_project,
                                             world_rotation)
from guided_concepts.prepare.sources import SourceObject, spread_views

ROLL_WARNING = 10.0        # degrees: the pose word has no roll
OFF_AXIS_WARNING = 10.0    # degrees between the optical axis and the object's centre


@dataclass
class PlannedView:
    stem: str
    view: object              # SourceView
    camera: dict | None       # orbit(): azimuth, elevation, distance, roll, off_axis


@dataclass
class PlannedObject:
    source: SourceObject
    views: list[PlannedView]
    normalisation: dict


def plan(objects: list[SourceObject], views: int, distance: float) -> tuple[list[PlannedObject], list[str]]:
    """Views chosen and cameras converted for every object -> (plans, warnings). `distance`: the
    median camera distance after scaling (0 keeps the source's units); one scale for all canonical
    objects (their sizes stay comparable), one per relative object (its units are its own)."""
    chosen = [spread_views(o.views, views) for o in objects]
    canonical = [np.linalg.norm(v.c2w[:3, 3]) for o, vs in zip(objects, chosen) if o.frame == "canonical"
                 for v in vs if v.c2w is not None]
    shared_scale = distance / float(np.median(canonical)) if distance and canonical else 1.0
    plans, warnings = [], []
    for obj, selected in zip(objects, chosen):
        cameras = [v.c2w for v in selected if v.c2w is not None]
        normalisation: dict = {}
        if cameras:
            c2ws = np.stack(cameras)
            if obj.frame == "canonical":
                centre, rotation, scale = np.zeros(3), world_rotation(obj.world), shared_scale
            else:
                centre = nearest_point_to_axes(c2ws) if len(c2ws) > 1 else np.zeros(3)
                rotation = relative_frame(c2ws, centre)
                spread = float(np.median(np.linalg.norm(c2ws[:, :3, 3] - centre, axis=1)))
                scale = distance / spread if distance and spread > 0 else 1.0
            normalisation = {"centre": centre.round(9).tolist(), "rotation": rotation.round(9).tolist(),
                             "scale": round(scale, 9)}
        planned = []
        for index, view in enumerate(selected):
            stem = f"{index:03d}"
            where = f"{obj.name}/{view.origin or view.image.name}"
            try:
                camera = None if view.c2w is None else orbit(to_project(view.c2w, rotation, centre, scale))
            except CameraError as error:
                raise data_error(view.image, f"({where}) {error}") from None
            if camera is not None:
                if abs(camera["roll"]) > ROLL_WARNING:
                    warnings.append(f"{where}: camera roll {camera['roll']:.1f} degrees (the pose word has no roll)")
                if camera["off_axis"] > OFF_AXIS_WARNING:
                    warnings.append(f"{where}: the camera looks {camera['off_axis']:.1f} degrees away from the object's centre")
            planned.append(PlannedView(stem, view, camera))
        plans.append(PlannedObject(obj, planned, normalisation))
    return plans, warnings


def view_pixels(view, segment, segmenter_name: str) -> tuple[Image.Image, np.ndarray, str]:
    """-> (RGB image, bool mask [H,W], mask_source). A mask file, else alpha, else the segmenter."""
    rgb, alpha = masking.split_alpha(open_image(view.image))
    if view.mask is not None:
        mask_image = open_image(view.mask).convert("L").resize(rgb.size)
        mask, source = np.asarray(mask_image) >= 128, "file"
    elif alpha is not None:
        mask, source = alpha, "alpha"
    else:
        mask, source = segment(rgb), segmenter_name
    if not mask.any():
        raise data_error(view.image, f"the mask ({source}) is empty; try another --segmenter")
    return rgb, mask, source


SHEET_CELL, SHEET_COLUMNS, SHEET_ROWS = 112, 8, 32


def sheet_cell(image: Image.Image, mask: np.ndarray, cell: int = SHEET_CELL) -> Image.Image:
    """A view shrunk to a contact-sheet cell, outside the mask dimmed (kept instead of the view)."""
    picture = np.asarray(image.resize((cell, cell))).astype(np.float32)
    keep = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((cell, cell))) > 127
    picture[~keep] = picture[~keep] * 0.3 + np.array([255.0, 0, 0]) * 0.2
    return Image.fromarray(picture.astype(np.uint8))


def contact_sheet(rows: list[tuple[str, list[tuple[Image.Image, str]]]], path: Path, cell: int = SHEET_CELL) -> None:
    """The first SHEET_ROWS objects' first SHEET_COLUMNS views, the camera under each, so a
    reviewer sees the masks and where azimuth 0 is."""
    rows = rows[:SHEET_ROWS]
    canvas = Image.new("RGB", (150 + SHEET_COLUMNS * (cell + 4), max(1, len(rows)) * (cell + 18) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, views) in enumerate(rows):
        y = 4 + r * (cell + 18)
        draw.text((4, y + cell // 2), name[:22], fill="black")
        for c, (picture, label) in enumerate(views[:SHEET_COLUMNS]):
            canvas.paste(picture, (150 + c * (cell + 4), y))
            draw.text((150 + c * (cell + 4), y + cell + 2), label, fill="black")
    canvas.save(path)


OWN_FILES = ("prepare.json", "contact_sheet.png")


def check_out(out: Path, src: Path, force: bool) -> None:
    """OUT may be new or empty; a set prepare wrote is replaced with `force` when it holds nothing
    else; SRC inside OUT, or anything prepare did not write, is never replaced."""
    if out.exists() and not out.is_dir():
        raise data_error(out, "is a file, not a folder")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise data_error(out, f"holds the source {src}; write the object folders somewhere else")
    if not out.exists() or not any(out.iterdir()):
        return
    record = out / "prepare.json"
    if not record.is_file():
        raise data_error(out, "already exists and was not written by prepare (no prepare.json); "
                              "nothing is replaced, choose a new or empty folder")
    if not force:
        raise data_error(out, "already holds a prepared set; pass --force to replace it")
    try:
        written = set(json.loads(record.read_text())["names"]) | set(OWN_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        raise data_error(record, "cannot be read, so what prepare wrote is unknown; nothing is replaced") from None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
    if foreign:
        raise data_error(out / foreign[0], "was not written by prepare; move it out before --force replaces the set")


def safe_name(name: str, where) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name in OWN_FILES:
        raise data_error(where, f"object name {name!r} cannot be a folder name")
    return name


class LazySegmenter:
    """The segmenter is built (SAM loads its weights) only when a view needs it."""

    def __init__(self, name: str):
        self.name, self.segment = name, None

    def __call__(self, image):
        if self.segment is None:
            self.segment = masking.segmenter(self.name)
        return self.segment(image)


def write(plans: list[PlannedObject], out: Path, source: dict, segmenter_name: str, force: bool,
          src: Path | None = None) -> dict:
    """Object folders into OUT (see check_out); -> report."""
    out = Path(out)
    check_out(out, Path(src if src is not None else source["path"]), force)
    names = [safe_name(p.source.name, source["path"]) for p in plans]
    if len(set(names)) != len(names):
        raise data_error(out, "two source objects have the same name; prepare them into separate folders")
    segment = LazySegmenter(segmenter_name)
    report = {"source": source, "objects": len(plans), "views": 0, "mask_sources": {}, "names": names}

    def write_all(tmp: Path):
        sheet = []
        for planned in plans:
            folder = tmp / planned.source.name
            (folder / "views").mkdir(parents=True)
            (folder / "masks").mkdir()
            views_meta, sources, row = {}, set(), []
            for p in planned.views:
                rgb, mask, mask_source = view_pixels(p.view, segment, segmenter_name)
                rgb.save(folder / "views" / f"{p.stem}.png")
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(folder / "masks" / f"{p.stem}.png")
                sources.add(mask_source)
                entry: dict = {"extra": {"source": p.view.origin or p.view.image.name}}
                label = p.stem
                if p.camera is not None:
                    entry.update({k: round(p.camera[k], 9) for k in ("azimuth", "elevation", "distance")})
                    entry["extra"].update({k: round(p.camera[k], 4) for k in ("roll", "off_axis")})
                    label = f"az {p.camera['azimuth']:.0f} el {p.camera['elevation']:.0f}"
                views_meta[p.stem] = entry
                if len(sheet) < SHEET_ROWS and len(row) < SHEET_COLUMNS:
                    row.append((sheet_cell(rgb, mask), label))
                report["mask_sources"][mask_source] = report["mask_sources"].get(mask_source, 0) + 1
            meta = {"category": planned.source.category or DEFAULT_CATEGORY, "frame": planned.source.frame,
                    "source": {**source, "object": planned.source.name, "world": planned.source.world,
                               **planned.normalisation, "mask_source": sorted(sources), **planned.source.notes},
                    "views": views_meta}
            (folder / "meta.json").write_text(json.dumps(meta, indent=1))
            report["views"] += len(planned.views)
            sheet.append((planned.source.name, row))
        contact_sheet(sheet, tmp / "contact_sheet.png")
        (tmp / "prepare.json").write_text(json.dumps(report, indent=1))
    atomic_folder(out, write_all)
    return report
