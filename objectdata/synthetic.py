"""Procedural synthetic chairs: a tiny, deterministic multi-view data set in the folder format.

Each chair is a few boxes (seat, back, 4 legs, optional arms) rendered with a pinhole camera,
painter's algorithm and Lambert shading via PIL polygons. meta.json records each view's camera
and the 2D projections of 10 fixed semantic 3D points.

By default every view's camera comes from a small pool shared by all chairs (CAMERA_POOL), so
different chairs are seen from exactly the same cameras: training can pair "same object, other
view" and "other object, same view" (see objectdata.sampling.TripletBatchSampler).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORY = "chair"
DATA_ENV_VAR = "GUIDED_CONCEPTS_DATA"
DEFAULT_DIR_NAME = "synthetic_chairs_v2"  # bump the version whenever the output changes
DEFAULT_NUM_OBJECTS = 12
DEFAULT_VIEWS_PER_OBJECT = 6

# Chair frame: x = chair's right(+)/left(-), y = up, z = front(+). Azimuth 0 sees the front.
KEYPOINT_NAMES = (
    "seat_front_left", "seat_front_right", "seat_back_right", "seat_back_left",
    "back_top_left", "back_top_right",
    "foot_front_left", "foot_front_right", "foot_back_right", "foot_back_left",
)
# A mirror image swaps left and right: flipped keypoint i sits where keypoint KEYPOINT_FLIP[i] was.
KEYPOINT_FLIP = (1, 0, 3, 2, 5, 4, 7, 6, 9, 8)

SUPERSAMPLE = 2  # render at 2x, downsample with LANCZOS for antialiasing
FOCAL = 1.05  # focal length in units of image width (~51 degree field of view)
AMBIENT = 0.35
LIGHT_DIRECTION = np.array([0.45, 0.8, 0.55]) / np.linalg.norm([0.45, 0.8, 0.55])

# Box corners as (+-1, +-1, +-1): bit 0 = x, bit 1 = y, bit 2 = z. Each face lists its
# 4 corners in cyclic order, with its outward normal.
_CORNER_SIGNS = np.array([[(i >> a) & 1 for a in range(3)] for i in range(8)], dtype=float) * 2 - 1  # [8,3]
_FACES = (
    ((0, 2, 6, 4), (-1, 0, 0)), ((1, 3, 7, 5), (1, 0, 0)),
    ((0, 1, 5, 4), (0, -1, 0)), ((2, 3, 7, 6), (0, 1, 0)),
    ((0, 1, 3, 2), (0, 0, -1)), ((4, 5, 7, 6), (0, 0, 1)),
)


@dataclass
class Box:
    centre: np.ndarray  # [3]
    size: np.ndarray  # [3] full extents
    colour: np.ndarray  # [3] RGB in [0,1]

    def corners(self) -> np.ndarray:  # [8,3]
        return self.centre + _CORNER_SIGNS * self.size / 2


@dataclass
class Chair:
    boxes: list[Box]
    keypoints: np.ndarray  # [10,3] in KEYPOINT_NAMES order
    shape: dict  # sampled proportions, written to meta.json for reference


def sample_chair(rng: np.random.Generator, has_arms: bool | None = None, back_height: float | None = None,
                 colours: np.ndarray | None = None) -> Chair:
    """Random proportions and part colours, normalised to fit the unit sphere around the origin.

    `has_arms`, `back_height` and `colours` ([4,3]: seat, back, legs, arms) override the drawn
    values; every value is still drawn, so overriding one keeps the others what they would be.
    """
    width, depth = rng.uniform(0.8, 1.2), rng.uniform(0.75, 1.1)
    seat_height, seat_thickness = rng.uniform(0.55, 0.85), rng.uniform(0.08, 0.16)
    leg_thickness, leg_inset = rng.uniform(0.06, 0.14), rng.uniform(0.0, 0.08)
    back_height_drawn, back_thickness = rng.uniform(0.45, 0.85), rng.uniform(0.06, 0.12)
    has_arms_drawn = bool(rng.random() < 0.5)
    arm_height, arm_thickness = rng.uniform(0.2, 0.35), rng.uniform(0.07, 0.12)
    # Darkish colours so no part melts into the white background.
    drawn_colours = rng.uniform(0.08, 0.8, size=(4, 3))
    has_arms = has_arms if has_arms is not None else has_arms_drawn
    back_height = back_height if back_height is not None else back_height_drawn
    seat_colour, back_colour, leg_colour, arm_colour = drawn_colours if colours is None else np.asarray(colours, float)

    def box(centre, size, colour) -> Box:
        return Box(np.array(centre, dtype=float), np.array(size, dtype=float), colour)

    boxes = [
        box((0, seat_height - seat_thickness / 2, 0), (width, seat_thickness, depth), seat_colour),
        box((0, seat_height + back_height / 2, -depth / 2 + back_thickness / 2),
            (width, back_height, back_thickness), back_colour),
    ]
    leg_length = seat_height - seat_thickness
    leg_x = width / 2 - leg_thickness / 2 - leg_inset
    leg_z = depth / 2 - leg_thickness / 2 - leg_inset
    leg_corners = ((-1, 1), (1, 1), (1, -1), (-1, -1))  # front-left, front-right, back-right, back-left
    for sx, sz in leg_corners:
        boxes.append(box((sx * leg_x, leg_length / 2, sz * leg_z),
                         (leg_thickness, leg_length, leg_thickness), leg_colour))
    if has_arms:
        arm_x = width / 2 - arm_thickness / 2
        rest_depth = depth - back_thickness
        for sx in (-1, 1):
            boxes.append(box((sx * arm_x, seat_height + arm_height, back_thickness / 2),
                             (arm_thickness, arm_thickness * 0.8, rest_depth), arm_colour))
            boxes.append(box((sx * arm_x, seat_height + arm_height / 2, depth / 2 - arm_thickness / 2),
                             (arm_thickness * 0.8, arm_height, arm_thickness * 0.8), arm_colour))

    back_front_z = -depth / 2 + back_thickness
    keypoints = np.array(
        [(sx * width / 2, seat_height, sz * depth / 2) for sx, sz in leg_corners]
        + [(-width / 2, seat_height + back_height, back_front_z),
           (width / 2, seat_height + back_height, back_front_z)]
        + [(sx * leg_x, 0.0, sz * leg_z) for sx, sz in leg_corners]
    )  # [10,3]

    # Centre the bounding box on the origin and scale into the unit sphere, so one camera
    # setup frames every chair.
    corners = np.concatenate([b.corners() for b in boxes])  # [8*num_boxes,3]
    centre = (corners.min(0) + corners.max(0)) / 2
    scale = 1.0 / np.linalg.norm(corners - centre, axis=1).max()
    for b in boxes:
        b.centre, b.size = (b.centre - centre) * scale, b.size * scale
    shape = {
        "width": width, "depth": depth, "seat_height": seat_height, "seat_thickness": seat_thickness,
        "leg_thickness": leg_thickness, "back_height": back_height, "has_arms": has_arms,
    }
    shape = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in shape.items()}
    return Chair(boxes=boxes, keypoints=(keypoints - centre) * scale, shape=shape)


def camera_basis(azimuth: float, elevation: float, distance: float):
    """Camera position [3] and world->camera rotation [3,3] (rows: right, up, forward)."""
    az, el = np.radians(azimuth), np.radians(elevation)
    position = distance * np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    forward = -position / np.linalg.norm(position)  # looks at the origin (chair centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return position, np.stack([right, up, forward])


def project(points: np.ndarray, position: np.ndarray, rotation: np.ndarray, resolution: int):
    """World points [N,3] -> pixel coords [N,2] (continuous: pixel i spans [i, i+1)) and depth [N]."""
    camera = (points - position) @ rotation.T  # [N,3] (right, up, forward)
    depth = camera[:, 2]
    focal = FOCAL * resolution
    x = resolution / 2 + focal * camera[:, 0] / depth
    y = resolution / 2 - focal * camera[:, 1] / depth  # image y points down
    return np.stack([x, y], axis=1), depth


def render_view(chair: Chair, azimuth: float, elevation: float, distance: float, resolution: int):
    """-> (RGB image, L mask with 0/255, keypoints [10,2] in output pixel coords)."""
    position, rotation = camera_basis(azimuth, elevation, distance)
    big = resolution * SUPERSAMPLE
    faces = []  # (distance to camera, polygon in PIL coords, RGB)
    for box in chair.boxes:
        corners = box.corners()  # [8,3]
        pixels, _ = project(corners, position, rotation, resolution)  # [8,2]
        # PIL polygon coords share our continuous convention (integers on pixel corners),
        # so scaling is all it takes; the mirror test in tests/test_data.py pins this down.
        pixels = pixels * SUPERSAMPLE
        for corner_ids, normal in _FACES:
            centre = corners[list(corner_ids)].mean(0)
            if np.dot(normal, position - centre) <= 0:
                continue  # back-facing
            shade = AMBIENT + (1 - AMBIENT) * max(0.0, float(np.dot(normal, LIGHT_DIRECTION)))
            colour = tuple(int(round(c * 255)) for c in np.clip(box.colour * shade, 0, 1))
            polygon = [tuple(p) for p in pixels[list(corner_ids)].tolist()]
            faces.append((float(np.linalg.norm(position - centre)), polygon, colour))

    image = Image.new("RGB", (big, big), (255, 255, 255))
    mask = Image.new("L", (big, big), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _, polygon, colour in sorted(faces, key=lambda face: -face[0]):  # painter's: far to near
        draw_image.polygon(polygon, fill=colour)
        draw_mask.polygon(polygon, fill=255)

    image = image.resize((resolution, resolution), Image.LANCZOS)
    mask_values = np.asarray(mask.resize((resolution, resolution), Image.LANCZOS))
    mask = Image.fromarray(np.where(mask_values >= 128, 255, 0).astype(np.uint8), mode="L")
    keypoints, _ = project(chair.keypoints, position, rotation, resolution)
    return image, mask, keypoints


# Shared camera pool: 8 azimuths 45 degrees apart, offset by 22.5 so no view is exactly frontal,
# side-on or from behind, times 2 elevations, at one distance. The azimuths are symmetric under
# negation, so a horizontally flipped view (camera at -azimuth) still lands on a pool camera.
POOL_AZIMUTHS = tuple(-157.5 + 45.0 * i for i in range(8))  # -157.5, -112.5, ..., 157.5
POOL_ELEVATIONS = (10.0, 30.0)
POOL_DISTANCE = 2.5
CAMERA_POOL = tuple((azimuth, elevation, POOL_DISTANCE)
                    for elevation in POOL_ELEVATIONS for azimuth in POOL_AZIMUTHS)  # 16 cameras


def pool_cameras(rng: np.random.Generator, views: int) -> list[tuple[float, float, float]]:
    """`views` distinct cameras from CAMERA_POOL, drawn by the object's own generator, in pool order."""
    if views > len(CAMERA_POOL):
        raise ValueError(f"the camera pool has {len(CAMERA_POOL)} cameras; cannot take {views} distinct "
                         f"views per object (use camera_pool=False for random cameras)")
    chosen = np.sort(rng.choice(len(CAMERA_POOL), size=views, replace=False))
    return [CAMERA_POOL[int(i)] for i in chosen]


def view_cameras(rng: np.random.Generator, views: int) -> list[tuple[float, float, float]]:
    """Azimuths spread around the circle with a random offset; random elevation and distance."""
    offset = rng.uniform(0, 360 / views)
    azimuths = (np.arange(views) * 360 / views + offset + 180) % 360 - 180  # in [-180, 180)
    elevations = rng.uniform(5, 35, size=views)
    distances = rng.uniform(2.3, 2.8, size=views)
    return [(round(float(a), 3), round(float(e), 3), round(float(d), 3))
            for a, e, d in zip(azimuths, elevations, distances)]


def write_chair(folder: Path, chair: Chair, cameras, resolution: int) -> None:
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    views_meta = {}
    for index, (azimuth, elevation, distance) in enumerate(cameras):
        view_id = f"{index:03d}"
        image, mask, keypoints = render_view(chair, azimuth, elevation, distance, resolution)
        image.save(folder / "views" / f"{view_id}.png")
        mask.save(folder / "masks" / f"{view_id}.png")
        views_meta[view_id] = {
            "azimuth": azimuth, "elevation": elevation, "distance": distance,
            "keypoints": [[round(float(x), 3), round(float(y), 3)] for x, y in keypoints],
        }
    meta = {
        "category": CATEGORY,
        "keypoint_names": list(KEYPOINT_NAMES),
        "keypoint_flip": list(KEYPOINT_FLIP),
        "shape": chair.shape,
        "views": views_meta,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def plan_chairs(num_objects: int = DEFAULT_NUM_OBJECTS, views_per_object: int = DEFAULT_VIEWS_PER_OBJECT,
                seed: int = 0, camera_pool: bool = True) -> list[tuple[Chair, list[tuple[float, float, float]]]]:
    """(chair, cameras) per object, without rendering anything: what generate_chairs will write."""
    if num_objects < 1 or views_per_object < 1:
        raise ValueError(f"need at least one object and one view, got {num_objects} x {views_per_object}")
    plans = []
    for object_index in range(num_objects):
        rng = np.random.default_rng([seed, object_index])  # per object: adding objects keeps the others
        chair = sample_chair(rng)
        cameras = pool_cameras(rng, views_per_object) if camera_pool else view_cameras(rng, views_per_object)
        plans.append((chair, cameras))
    return plans


def generate_chairs(out_dir: Path | str, num_objects: int = DEFAULT_NUM_OBJECTS,
                    views_per_object: int = DEFAULT_VIEWS_PER_OBJECT, resolution: int = 64, seed: int = 0,
                    camera_pool: bool = True) -> Path:
    """Write chair_000/ ... into `out_dir` (which must be missing or empty). Same seed -> same bytes.

    camera_pool=True: each chair's views use `views_per_object` distinct cameras of CAMERA_POOL
    (at most 16), so several chairs share each camera. False: random cameras per chair, spread
    around the circle (no two chairs share a camera).
    """
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    plans = plan_chairs(num_objects, views_per_object, seed, camera_pool)  # validates before any writing
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; refusing to mix a new set with old files")
    out_dir.mkdir(parents=True, exist_ok=True)
    for object_index, (chair, cameras) in enumerate(plans):
        write_chair(out_dir / f"chair_{object_index:03d}", chair, cameras, resolution)
    return out_dir


def default_data_dir() -> Path:
    """$GUIDED_CONCEPTS_DATA if set, else ~/.cache/guided_concepts/<DEFAULT_DIR_NAME>."""
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "guided_concepts" / DEFAULT_DIR_NAME


def ensure_generated(path: Path, generate) -> Path:
    """Run `generate(folder)` into a sibling temp folder and rename it to `path`, unless `path`
    exists. Never leaves a half-written set."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise FileExistsError(f"{path}: exists but is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp folder (same filesystem) and rename it into place in one step.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:        # a read-only home or cache: name the folder and what moves it
        raise OSError(err.errno, f"cannot write the generated data set {path.name} there ({err.strerror}); set "
                      f"{DATA_ENV_VAR} (ToyWorld's data goes next to it) or data.root to a folder you can write",
                      str(path.parent)) from err
    try:
        generate(staging)
        try:
            os.replace(staging, path)
        except OSError:
            if not path.is_dir():  # a concurrent process winning the race is fine; anything else is not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_default_data(path: Path | str | None = None) -> Path:
    """Generate the default set (12 chairs x 6 pool views) at `path` unless it exists."""
    return ensure_generated(Path(path) if path is not None else default_data_dir(), generate_chairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate procedural synthetic chairs.")
    parser.add_argument("out", type=Path, help="output folder (must be missing or empty)")
    parser.add_argument("--objects", type=int, default=DEFAULT_NUM_OBJECTS)
    parser.add_argument("--views", type=int, default=DEFAULT_VIEWS_PER_OBJECT)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-camera-pool", dest="camera_pool", action="store_false",
                        help=f"random cameras per chair instead of the shared pool of {len(CAMERA_POOL)}")
    args = parser.parse_args(argv)
    try:
        print(generate_chairs(args.out, args.objects, args.views, args.resolution, args.seed,
                              camera_pool=args.camera_pool))
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))  # a usage message, not a traceback


if __name__ == "__main__":
    main()
