"""Other multi-view formats into this project's object folders (views/, masks/, meta.json).

    python -m guided_concepts.prepare SRC OUT --from transforms|co3d|objaverse|srn|photos
        [--category chair] [--views 24] [--segmenter threshold|grabcut|hf:FOLDER|sam:FOLDER]
        [--world +z,-y] [--frame canonical|relative] [--camera-axes opengl|opencv|pytorch3d]
        [--distance 2.5] [--min-quality 0.5] [--force]

Cameras become azimuth/elevation/distance in the project's frame (prepare/cameras.py says how);
views are spread around the object; masks come from a mask file, the image's alpha or the
segmenter. OUT also gets contact_sheet.png (masks and cameras to review) and prepare.json.
Everything is read and checked first; OUT is written in one rename, never over existing data
without --force.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guided_concepts.objectdata.records import DataError
from guided_concepts.prepare.cameras import AXIS_FLIPS, world_rotation
from guided_concepts.prepare.formats import FORMATS
from guided_concepts.prepare.masks import SEGMENTERS, check_segmenter
from guided_concepts.prepare.write import plan, write


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m guided_concepts.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the source: a file or folder in the --from format")
    parser.add_argument("out", type=Path, help="the object-folder root to write (--set data.root=OUT)")
    parser.add_argument("--from", dest="format", required=True, choices=sorted(FORMATS), help="the source's format")
    parser.add_argument("--category", default=None, help="category written to meta.json (CO3D: its own)")
    parser.add_argument("--views", type=int, default=24, help="views per object, spread around it (0 = all)")
    parser.add_argument("--segmenter", default="threshold", help=f"masks for views without one: {', '.join(SEGMENTERS)}")
    parser.add_argument("--world", default=None, help="source world's UP,FRONT axes (default per format)")
    parser.add_argument("--frame", choices=("canonical", "relative"), default=None,
                        help="canonical: one front shared by all objects (ShapeNet); relative: each its own")
    parser.add_argument("--camera-axes", dest="axes", choices=sorted(AXIS_FLIPS), default=None,
                        help="the source cameras' axes (default per format)")
    parser.add_argument("--distance", type=float, default=2.5, help="median camera distance after scaling (0: source units)")
    parser.add_argument("--min-quality", type=float, default=None, help="CO3D: skip sequences under this viewpoint_quality_score")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    reader = FORMATS[options.format]
    world_given = options.world is not None
    for key in ("world", "frame", "axes"):
        if getattr(options, key) is None:
            setattr(options, key, reader.DEFAULTS[key])
    warnings = []
    if world_given and options.frame == "relative":
        warnings.append(f"--world {options.world} is not used: a relative frame reads up and front from the cameras")
    try:
        if options.views < 0 or options.distance < 0:
            raise ValueError("--views and --distance must be >= 0")
        world_rotation(options.world)
        check_segmenter(options.segmenter)
        src = options.src.expanduser().resolve()       # "." names the object after its folder
        objects = reader.read(src, options)
        plans, notes = plan(objects, options.views, options.distance)
        warnings += notes
        source = {"format": options.format, "path": str(src), "camera_axes": options.axes}
        report = write(plans, options.out, source, options.segmenter, options.force, src)
    except (DataError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:          # OUT not writable, a full disk, a folder where a file should be
        print(f"error: {error.filename or options.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{options.out}: {report['objects']} objects, {report['views']} views "
          f"(masks: {', '.join(f'{k} {v}' for k, v in report['mask_sources'].items())}); "
          f"review {options.out / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
