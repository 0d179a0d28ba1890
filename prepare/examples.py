"""Small example sources in every format prepare reads, written the way each format's own tools
lay them out: the tests' data, and the README's worked examples.

    python -m guided_concepts.prepare.examples OUT      # OUT/{transforms,objaverse,srn,co3d,photos}

Every object is a procedural chair rendered at CAMERAS (project frame). Captures without a common
frame (transforms, Objaverse, CO3D) are moved by a random rotation, scale and offset, as COLMAP
or a phone capture would leave them.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from guided_concepts.objectdata.synthetic import render_view, sample_chair
from guided_concepts.prepare.cameras import AXIS_FLIPS, orbit_c2w, world_rotation

# Azimuths all round, elevations and distances that differ: a capture's cameras.
CAMERAS = [(-150.0, 5.0, 2.4), (-90.0, 25.0, 2.6), (-20.0, 40.0, 2.5), (30.0, 15.0, 2.8), (100.0, 30.0, 2.45),
           (170.0, 10.0, 2.55)]
RES = 48


def views_of(seed: int):
    """A chair's renders at CAMERAS -> [(RGB image, bool mask)]."""
    chair = sample_chair(np.random.default_rng(seed))
    out = []
    for camera in CAMERAS:
        image, mask, _ = render_view(chair, *camera, RES)
        out.append((image, np.asarray(mask) > 127))
    return out


def rgba(image, mask) -> Image.Image:
    return Image.fromarray(np.dstack([np.asarray(image), mask.astype(np.uint8) * 255]), "RGBA")


def random_similarity(seed: int):
    """A capture's own frame (COLMAP, CO3D): a random rotation, scale and offset of the world."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    return q, float(rng.uniform(0.3, 3.0)), rng.normal(size=3)


def source_c2w(camera, world: str, similarity=None, axes: str = "opengl") -> np.ndarray:
    """The project-frame orbit `camera` as a source tool writes it: in its world (UP,FRONT), moved
    by `similarity` (rotation, scale, offset) for captures without a common frame, in `axes`."""
    c2w = orbit_c2w(*camera)
    back = world_rotation(world).T                    # project -> source world
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = back @ c2w[:3, :3], back @ c2w[:3, 3]
    if similarity is not None:
        q, s, t = similarity
        out[:3, :3], out[:3, 3] = q @ out[:3, :3], s * (q @ out[:3, 3]) + t
    out[:3, :3] = out[:3, :3] * AXIS_FLIPS[axes][None, :]
    return out


def write_transforms(root: Path, objects: int = 2, relative: bool = True) -> Path:
    for o in range(objects):
        folder = root / f"scene_{o}"
        (folder / "images").mkdir(parents=True)
        similarity = random_similarity(o) if relative else None
        frames = []
        for i, (image, mask) in enumerate(views_of(o)):
            rgba(image, mask).save(folder / "images" / f"r_{i}.png")
            frames.append({"file_path": f"./images/r_{i}",
                           "transform_matrix": source_c2w(CAMERAS[i], "+z,-y", similarity).tolist()})
        (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return root


def write_objaverse(root: Path, objects: int = 2) -> Path:
    for o in range(objects):
        folder = root / f"uid{o:04d}"
        folder.mkdir(parents=True)
        similarity = random_similarity(10 + o)
        for i, (image, mask) in enumerate(views_of(o)):
            rgba(image, mask).save(folder / f"{i:03d}.png")
            np.save(folder / f"{i:03d}.npy", np.linalg.inv(source_c2w(CAMERAS[i], "+z,-y", similarity))[:3])
    return root


def write_srn(root: Path, objects: int = 2) -> Path:
    for o in range(objects):
        folder = root / f"{o:032x}"
        (folder / "rgb").mkdir(parents=True)
        (folder / "pose").mkdir()
        for i, (image, _) in enumerate(views_of(o)):
            image.save(folder / "rgb" / f"{i:06d}.png")     # white background, no alpha: threshold masks
            matrix = source_c2w(CAMERAS[i], "+y,+z", axes="opencv")
            (folder / "pose" / f"{i:06d}.txt").write_text(" ".join(f"{v:.17g}" for v in matrix.ravel()))
        (folder / "intrinsics.txt").write_text("131.25 64 64 0.\n0. 0. 0.\n1.\n128 128\n")
    return root


def write_co3d(root: Path, objects: int = 2, category: str = "chair") -> Path:
    folder = root / category
    frames, sequences = [], []
    for o in range(objects):
        name = f"{100 + o}_{o}_{o}"
        (folder / name / "images").mkdir(parents=True)
        (folder / name / "masks").mkdir()
        similarity = random_similarity(20 + o)
        for i, (image, mask) in enumerate(views_of(o)):
            image.save(folder / name / "images" / f"frame{i + 1:06d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name / "masks" / f"frame{i + 1:06d}.png")
            w2c = np.linalg.inv(source_c2w(CAMERAS[i], "+y,+z", similarity, axes="pytorch3d"))
            frames.append({"sequence_name": name, "frame_number": i,
                           "image": {"path": f"{category}/{name}/images/frame{i + 1:06d}.png", "size": [RES, RES]},
                           "mask": {"path": f"{category}/{name}/masks/frame{i + 1:06d}.png", "mass": float(mask.sum())},
                           "viewpoint": {"R": w2c[:3, :3].T.tolist(), "T": w2c[:3, 3].tolist(),
                                         "focal_length": [2.0, 2.0], "principal_point": [0.0, 0.0]}})
        sequences.append({"sequence_name": name, "category": category, "viewpoint_quality_score": 0.5 + o})
    for file, content in (("frame_annotations.jgz", frames), ("sequence_annotations.jgz", sequences)):
        with gzip.open(folder / file, "wt", encoding="utf-8") as handle:
            json.dump(content, handle)
    return folder


def write_photos(root: Path, objects: int = 2) -> Path:
    for o in range(objects):
        (root / f"dog{o}").mkdir(parents=True)
        for i, (image, _) in enumerate(views_of(o)[:4]):
            image.save(root / f"dog{o}" / f"{i:02d}.jpg", quality=95)
    return root


def world2_scenes(background: int, count: int = 12, resolution: int = 128):
    """ToyWorld 2 objects on a background level (0 plain, 1 floor, 2 clutter) with their true masks."""
    from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES
    from guided_concepts.toyworld.world2 import CATEGORIES, Shape, WorldObject, render
    rng = np.random.default_rng(background)
    for i in range(count):
        obj = WorldObject(CATEGORIES[i % 4], Shape.sample(rng), COLOURS[COLOUR_NAMES[i % 6]])
        image, mask = render(obj, float(rng.uniform(-180, 180)), float(rng.uniform(10, 35)), 2.6, resolution,
                             background, i)
        yield Image.fromarray(image), np.asarray(mask)


WRITERS = {"transforms": write_transforms, "objaverse": write_objaverse, "srn": write_srn, "co3d": write_co3d,
           "photos": write_photos}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m guided_concepts.prepare.examples OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} already exists and is not empty", file=sys.stderr)
        return 2
    for name, write in WRITERS.items():
        source = write(out / name)
        print(f"python -m guided_concepts.prepare {source} data/{name} --from {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
