"""ToyWorld 2's world: several categories built from one shared shape space, and a
background-complexity axis. Deterministic from its parameters. Pretraining on it:
toyworld/world2_pretraining.py; its scorer: world2_scorer.py; data for the framework: world2_data.py.

Every object is (category, shape, colour): any category renders with any shape, so "a table with
this chair's shape" has a true render. The shape is six numbers in [0, 1] (SHAPE_PARAMS), mapped
to physical sizes by SHAPE_RANGES; a category decides how the parts look (CATEGORY_PARTS), never
which shape values it may take:

    chair   a seat slab on four square legs; the back a thin panel; arms posts and rails
    table   a thin top overhanging its legs, with an apron under it; the back a low gallery
            panel at the top's back edge; arms side rails along the top
    sofa    two seat cushions on a skirted base with stubby feet; a thick cushioned back; thick
            block arms
    stool   a cross-shaped top on four legs held by a footrest ring; the back a single post with
            a small rest; arms short pegs

Backgrounds (BACKGROUNDS): 0 plain white, 1 a tiled floor, 2 the floor with distractor blocks
behind the object. The object's mask never includes the background.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from guided_concepts.objectdata.synthetic import Box, Chair, render_view

SHAPE_PARAMS = ("width", "depth", "leg_length", "leg_thickness", "back_height", "arm_height")
SHAPE_RANGES = {          # [0, 1] -> physical size (the seat/top spans width x depth)
    "width": (0.7, 1.3), "depth": (0.6, 1.2), "leg_length": (0.2, 0.9), "leg_thickness": (0.04, 0.16),
    "back_height": (0.0, 0.9), "arm_height": (0.0, 0.4),
}
WORLD_RADIUS = 1.3        # the largest object (every part at its largest) fits the unit sphere
NO_PART = 0.05            # a back or arm shorter than this (physical units) is not built
CATEGORIES = ("chair", "table", "sofa", "stool")
# One camera distance: with ToyWorld 1's 2.3-2.8, a wide object and a near one looked alike and the
# scorer read width and depth at chance (MAE 0.20 against 0.25). Elevation as in ToyWorld 1.
CAMERA_DISTANCE = 2.5
ELEVATION_RANGE = (5.0, 35.0)
BACKGROUNDS = ("plain", "floor", "clutter")


@dataclass(frozen=True)
class Shape:
    """The shared shape space: each value in [0, 1]."""
    width: float = 0.5
    depth: float = 0.5
    leg_length: float = 0.5
    leg_thickness: float = 0.5
    back_height: float = 0.5
    arm_height: float = 0.5

    def __post_init__(self):
        for name in SHAPE_PARAMS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"shape.{name}: must be a number in [0, 1], got {value!r}")

    def physical(self) -> dict:
        return {n: lo + (hi - lo) * getattr(self, n) for n, (lo, hi) in SHAPE_RANGES.items()}

    @staticmethod
    def sample(rng: np.random.Generator) -> "Shape":
        return Shape(*(float(v) for v in rng.random(len(SHAPE_PARAMS))))


@dataclass(frozen=True)
class WorldObject:
    """One object's identity: what meta.json records (`to_meta` / `from_meta` round-trip)."""
    category: str
    shape: Shape
    colour: tuple[float, float, float]

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category: {self.category!r} is not one of {', '.join(CATEGORIES)}")

    def to_meta(self) -> dict:
        """meta.json's keys (objectdata.meta.TOP_LEVEL_KEYS): the category, and the ground truth
        under shape.toyworld2, as ToyWorld 1 keeps its own under shape.toyworld."""
        return {"category": self.category,
                "shape": {"toyworld2": {**asdict(self.shape), "colour": [float(c) for c in self.colour]}}}

    @staticmethod
    def from_meta(meta: dict) -> "WorldObject":
        truth = dict(meta["shape"]["toyworld2"])
        colour = tuple(truth.pop("colour"))
        return WorldObject(meta["category"], Shape(**truth), colour)


def sample_camera(rng: np.random.Generator) -> tuple[float, float, float]:
    """(azimuth in [-180, 180), elevation, distance) of a random view of ToyWorld 2."""
    return float(rng.uniform(-180, 180)), float(rng.uniform(*ELEVATION_RANGE)), CAMERA_DISTANCE


def _box(centre, size, colour) -> Box:
    return Box(np.array(centre, float), np.array(size, float), np.clip(np.array(colour, float), 0, 1))


def _legs(width, depth, length, thickness, colour, inset=0.0) -> list[Box]:
    x, z = width / 2 - thickness / 2 - inset, depth / 2 - thickness / 2 - inset
    return [_box((sx * x, length / 2, sz * z), (thickness, length, thickness), colour)
            for sx, sz in ((-1, 1), (1, 1), (1, -1), (-1, -1))]


def _chair(p: dict, rgb: np.ndarray) -> list[Box]:
    w, d, legs, t, back, arms = (p[n] for n in SHAPE_PARAMS)
    seat = 0.1
    top = legs + seat
    boxes = [_box((0, legs + seat / 2, 0), (w, seat, d), rgb)] + _legs(w, d, legs, t, rgb * 0.7)
    if back > NO_PART:
        boxes.append(_box((0, top + back / 2, -d / 2 + 0.04), (w, back, 0.08), rgb * 0.9))
    if arms > NO_PART:
        for sx in (-1, 1):
            boxes.append(_box((sx * (w / 2 - 0.04), top + arms, 0.04), (0.08, 0.06, d - 0.08), rgb))
            boxes.append(_box((sx * (w / 2 - 0.04), top + arms / 2, d / 2 - 0.04), (0.06, arms, 0.06), rgb))
    return boxes


def _table(p: dict, rgb: np.ndarray) -> list[Box]:
    w, d, legs, t, back, arms = (p[n] for n in SHAPE_PARAMS)
    plate, overhang = 0.05, 0.08
    top = legs + plate
    boxes = [_box((0, legs + plate / 2, 0), (w + 2 * overhang, plate, d + 2 * overhang), rgb)]
    boxes += _legs(w, d, legs, t, rgb * 0.6)
    apron = min(0.12, legs * 0.4)           # the table's cue: a band under the top, between the legs
    for sx in (-1, 1):
        boxes.append(_box((sx * (w / 2 - t / 2), legs - apron / 2, 0), (0.03, apron, d - t), rgb * 0.5))
    for sz in (-1, 1):
        boxes.append(_box((0, legs - apron / 2, sz * (d / 2 - t / 2)), (w - t, apron, 0.03), rgb * 0.5))
    if back > NO_PART:                       # a gallery panel standing on the top's back edge
        boxes.append(_box((0, top + back * 0.5 / 2, -d / 2 - overhang + 0.02), (w + 2 * overhang, back * 0.5, 0.04),
                          rgb * 0.8))
    if arms > NO_PART:                       # rails along the sides, on short posts
        for sx in (-1, 1):
            boxes.append(_box((sx * (w / 2 + overhang - 0.02), top + arms / 2, 0), (0.04, arms, d), rgb * 0.8))
    return boxes


def _sofa(p: dict, rgb: np.ndarray) -> list[Box]:
    w, d, legs, t, back, arms = (p[n] for n in SHAPE_PARAMS)
    feet = max(0.06, legs * 0.45)
    cushion = 0.14
    base_top = legs - cushion / 2
    gap = 0.02                               # the seam between the two seat cushions: the sofa's cue
    boxes = []
    for sx in (-1, 1):                       # the skirted base in two halves, one under each cushion, so
        half = (sx * (w / 4 + gap / 4), None)  # the painter's sort never draws a base top over a cushion
        boxes.append(_box((half[0], feet + (base_top - feet) / 2, 0.02), (w / 2 - gap / 2, base_top - feet, d - 0.04),
                          rgb * 0.6))
        boxes.append(_box((half[0], base_top + cushion / 2, 0.02), (w / 2 - gap / 2, cushion, d - 0.04), rgb * 1.1))
    boxes += _legs(w, d, feet, 0.04 + 1.5 * t, rgb * 0.35)          # stubby feet, as thick as the legs say
    top = base_top + cushion
    if back > NO_PART:
        for sx in (-1, 1):                   # two thick back cushions
            boxes.append(_box((sx * (w / 4 + gap / 4), top + back / 2, -d / 2 + 0.11), (w / 2 - gap / 2, back, 0.22),
                              rgb))
    if arms > NO_PART:
        for sx in (-1, 1):
            boxes.append(_box((sx * (w / 2 + 0.09), (feet + top + arms) / 2, 0), (0.18, top + arms - feet, d), rgb * 0.8))
    return boxes


def _stool(p: dict, rgb: np.ndarray) -> list[Box]:
    w, d, legs, t, back, arms = (p[n] for n in SHAPE_PARAMS)
    plate = 0.08
    top = legs + plate
    boxes = [_box((0, legs + plate / 2, 0), (w, plate, d * 0.7), rgb),        # an octagon-like top:
             _box((0, legs + plate / 2, 0), (w * 0.7, plate, d), rgb)]        # two crossed slabs
    boxes += _legs(w * 0.85, d * 0.85, legs, t, rgb * 0.7)
    ring = legs * 0.35                       # the stool's cue: a footrest ring between the legs
    for sx in (-1, 1):
        boxes.append(_box((sx * (w * 0.425 - t / 2), ring, 0), (0.03, 0.03, d * 0.85), rgb * 0.45))
    for sz in (-1, 1):
        boxes.append(_box((0, ring, sz * (d * 0.425 - t / 2)), (w * 0.85, 0.03, 0.03), rgb * 0.45))
    if back > NO_PART:                       # two posts and a rail: a bar stool's low back
        for sx in (-1, 1):
            boxes.append(_box((sx * w * 0.3, top + back / 2, -d / 2 + 0.03), (0.05, back, 0.05), rgb * 0.7))
        boxes.append(_box((0, top + back - 0.04, -d / 2 + 0.03), (w * 0.7, 0.08, 0.05), rgb))
    if arms > NO_PART:                       # short pegs at the sides
        for sx in (-1, 1):
            boxes.append(_box((sx * w / 2, top + arms / 2, 0), (0.05, arms, 0.05), rgb * 0.7))
    return boxes


CATEGORY_PARTS = {"chair": _chair, "table": _table, "sofa": _sofa, "stool": _stool}


def build(obj: WorldObject) -> Chair:
    """Boxes of `obj`, centred and scaled into the unit sphere (one camera frames every object),
    with 10 keypoints (top corners, back top edge, feet) in objectdata.synthetic's layout."""
    p = obj.shape.physical()
    boxes = CATEGORY_PARTS[obj.category](p, np.asarray(obj.colour, float))
    corners = np.concatenate([b.corners() for b in boxes])             # [8 * boxes, 3]
    lo, hi = corners.min(0), corners.max(0)
    centre = (lo + hi) / 2
    # One scale for every object (not each fitted to the frame): sizes and proportions stay
    # comparable across objects and categories, which is what "the same shape" means here.
    scale = 1.0 / WORLD_RADIUS
    w, d = p["width"] / 2, p["depth"] / 2
    top_y = max(b.centre[1] + b.size[1] / 2 for b in boxes[:1])
    keypoints = np.array([(sx * w, top_y, sz * d) for sx, sz in ((-1, 1), (1, 1), (1, -1), (-1, -1))]
                         + [(-w, hi[1], -d), (w, hi[1], -d)]
                         + [(sx * w, lo[1], sz * d) for sx, sz in ((-1, 1), (1, 1), (1, -1), (-1, -1))])
    for b in boxes:
        b.centre, b.size = (b.centre - centre) * scale, b.size * scale
    return Chair(boxes=boxes, keypoints=(keypoints - centre) * scale, shape=obj.to_meta())


def _background_boxes(level: int, floor_y: float, seed: int, azimuth: float) -> tuple[list[Box], list[Box]]:
    """(floor tiles, distractor blocks) for a background level, from its own seed; the blocks
    stand behind the object and to its sides as this camera (`azimuth`) sees it, so they show."""
    rng = np.random.default_rng([seed, 31])
    tiles, blocks = [], []
    if level >= 1:
        shades = rng.uniform(0.55, 0.9, size=2)
        size = rng.uniform(0.35, 0.6)
        n = int(np.ceil(3.0 / size))
        for i in range(-n, n):
            for j in range(-n, n):
                if np.hypot((i + 0.5) * size, (j + 0.5) * size) > 1.6:    # stay in front of every camera
                    continue
                shade = shades[(i + j) % 2]
                tiles.append(_box(((i + 0.5) * size, floor_y - 0.01, (j + 0.5) * size), (size, 0.02, size),
                                  (shade, shade * 0.97, shade * 0.92)))
    if level >= 2:
        for _ in range(int(rng.integers(2, 4))):
            angle = np.radians(azimuth + 180 + rng.choice([-1, 1]) * rng.uniform(35, 75))
            radius, size = rng.uniform(1.3, 2.2), rng.uniform(0.25, 0.6, size=3)
            blocks.append(_box((radius * np.sin(angle), floor_y + size[1] / 2, radius * np.cos(angle)), size,
                               rng.uniform(0.2, 0.7, size=3)))
    return tiles, blocks


def render(obj: WorldObject, azimuth: float, elevation: float, distance: float, resolution: int,
           background: int = 0, background_seed: int = 0):
    """-> (RGB uint8 [H, W, 3], object mask bool [H, W]). The background is drawn behind the object
    (level 0 white, 1 a tiled floor, 2 the floor with distractor blocks)."""
    if background not in range(len(BACKGROUNDS)):
        raise ValueError(f"background: {background!r} is not a level 0..{len(BACKGROUNDS) - 1} ({', '.join(BACKGROUNDS)})")
    geometry = build(obj)
    image, mask, _ = render_view(geometry, azimuth, elevation, distance, resolution)
    image, mask = np.asarray(image).copy(), np.asarray(mask) > 127
    if background == 0:
        return image, mask
    floor_y = min(b.centre[1] - b.size[1] / 2 for b in geometry.boxes)
    tiles, blocks = _background_boxes(background, floor_y, background_seed, azimuth)
    camera = (azimuth, elevation, distance)
    scene = np.asarray(render_view(Chair(tiles, np.zeros((10, 3)), {}), *camera, resolution)[0]).copy()
    if blocks:                             # behind or beside the object: drawn first, the object over them
        block_image, block_mask, _ = render_view(Chair(blocks, np.zeros((10, 3)), {}), *camera, resolution)
        scene[np.asarray(block_mask) > 127] = np.asarray(block_image)[np.asarray(block_mask) > 127]
    scene[mask] = image[mask]
    return scene, mask


# -- what the world shows: `python -m toyworld.world2 [--grid out.png]` -----------------------------
def shape_overlap(num_shapes: int = 16, azimuths=(30.0, 90.0), resolution: int = 32, seed: int = 0) -> dict:
    """Mean silhouette IoU of one shape across categories against other shapes within one category
    (per azimuth): the first above the second is what "one shape space" means in pixels."""
    import itertools
    rng = np.random.default_rng(seed)
    shapes = [Shape.sample(rng) for _ in range(num_shapes)]

    def iou(a, b):
        return float((a & b).sum() / max((a | b).sum(), 1))
    out = {}
    for azimuth in azimuths:
        masks = {(c, i): render(WorldObject(c, s, (0.2, 0.5, 0.2)), azimuth, 20.0, 2.5, resolution)[1]
                 for c in CATEGORIES for i, s in enumerate(shapes)}
        pairs = {f"{a}-{b}": float(np.mean([iou(masks[(a, i)], masks[(b, i)]) for i in range(num_shapes)]))
                 for a, b in itertools.combinations(CATEGORIES, 2)}
        within = float(np.mean([iou(masks[(c, i)], masks[(c, j)]) for c in CATEGORIES
                                for i, j in itertools.combinations(range(num_shapes), 2)]))
        out[azimuth] = {"same shape, other category": float(np.mean(list(pairs.values()))),
                        "same category, other shape": within, "pairs": pairs}
    return out


def shape_grid(path, shapes: int = 4, resolution: int = 48, background: int = 0, seed: int = 0, scale: int = 2):
    """A labelled PNG: row i is one shape (its six values at the left) rendered in every category
    (columns: CATEGORIES order), at azimuth 30, elevation 20."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    colours = [(0.8, 0.15, 0.1), (0.15, 0.6, 0.2), (0.12, 0.25, 0.8), (0.55, 0.15, 0.65)]
    cell, label_width = resolution * scale + 4, 250
    canvas = Image.new("RGB", (label_width + cell * len(CATEGORIES), 16 + cell * shapes), "white")
    draw = ImageDraw.Draw(canvas)
    for j, category in enumerate(CATEGORIES):
        draw.text((label_width + j * cell + 4, 2), category, fill="black")
    for i in range(shapes):
        shape = Shape.sample(rng)
        short = dict(zip(SHAPE_PARAMS, ("width", "depth", "legs", "thick", "back", "arms")))
        values = [f"{short[n]} {getattr(shape, n):.2f}" for n in SHAPE_PARAMS]
        draw.text((4, 16 + i * cell + cell // 2 - 18), f"shape {i}:\n" + "  ".join(values[:3]) + "\n"
                  + "  ".join(values[3:]), fill="black")
        for j, category in enumerate(CATEGORIES):
            image, _ = render(WorldObject(category, shape, colours[i % 4]), 30.0, 20.0, CAMERA_DISTANCE, resolution,
                              background, i)
            canvas.paste(Image.fromarray(image).resize((resolution * scale,) * 2, Image.NEAREST),
                         (label_width + j * cell + 2, 16 + i * cell + 2))
    canvas.save(path)
    return path


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="ToyWorld 2's world: shape overlap table and a shape grid")
    parser.add_argument("--grid", help="also write a PNG: shapes (rows) x categories (columns)")
    parser.add_argument("--background", type=int, default=0, help="background level of the grid (0, 1, 2)")
    args = parser.parse_args()
    print(json.dumps(shape_overlap(), indent=1))
    if args.grid:
        print(shape_grid(args.grid, background=args.background))
