"""Plain photo folders (the DreamBooth dataset): images only, no cameras, no masks. SRC is one
folder of images (one object) or a folder of such folders. Masks come from `--segmenter`."""
from __future__ import annotations

from pathlib import Path

from guided_concepts.objectdata.folder import IMAGE_EXTENSIONS
from guided_concepts.objectdata.records import data_error
from guided_concepts.prepare.sources import SourceObject, SourceView

DEFAULTS = {"world": "+y,+z", "frame": "relative", "axes": "opengl"}
IMAGES = IMAGE_EXTENSIONS


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGES and not p.name.startswith("."))


def read(src: Path, options) -> list[SourceObject]:
    if not src.is_dir():
        raise data_error(src, "is not a folder of photos")
    folders = [src] if images(src) else sorted(p for p in src.iterdir() if p.is_dir() and images(p))
    if not folders:
        raise data_error(src, f"no images ({', '.join(IMAGES)}) here or in its subfolders")
    return [SourceObject(folder.name, options.category, options.frame,
                         [SourceView(p, origin=p.name) for p in images(folder)]) for folder in folders]
