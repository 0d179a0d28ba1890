"""ToyWorld's world: chairs with named attributes, their captions and renders.

The geometry is objectdata.synthetic's chair; ToyWorld fixes the attributes a caption can name
and a scorer can check: a colour from a small palette, arms or none, a low or a tall back, and
the direction it is seen from (8 bins of 45 degrees). Every attribute is a class index:

    colour    0..5   COLOURS
    arms      0 = without arms, 1 = with arms
    back      0 = low back (height 0.45-0.58), 1 = tall back (0.72-0.85); the gap keeps the bins apart
    direction 0..7   DIRECTIONS, bin i centred on azimuth 45 * i (0 = seen from the front)

Some (colour, arms, back) combinations never appear in pretraining (HELD_OUT_COMBOS): prompts
that put them together measure whether the base model composes attributes it saw apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guided_concepts.objectdata.synthetic import default_data_dir, ensure_generated, render_view, sample_chair

# Darkish, well-separated hues: no part melts into the white background.
COLOURS = {
    "red": (0.80, 0.12, 0.10),
    "green": (0.15, 0.60, 0.20),
    "blue": (0.12, 0.25, 0.80),
    "yellow": (0.90, 0.75, 0.10),
    "purple": (0.55, 0.15, 0.65),
    "black": (0.15, 0.15, 0.15),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = ("front", "front right", "right", "back right", "back", "back left", "left", "front left")
BACK_BINS = ((0.45, 0.58), (0.72, 0.85))
ATTRIBUTES = {"colour": len(COLOURS), "arms": 2, "back": 2, "direction": len(DIRECTIONS)}
# (colour, arms, back) never rendered for pretraining; all other 20 of the 24 combinations are.
HELD_OUT_COMBOS = ((0, 1, 1), (2, 0, 0), (1, 1, 0), (3, 0, 1))
ELEVATION_RANGE = (5.0, 35.0)
DISTANCE_RANGE = (2.3, 2.8)
LEG_SHADE = 0.7   # legs a little darker than seat and back, so parts stay distinguishable


@dataclass(frozen=True)
class ToyChair:
    """One chair's identity: its geometry seed and named attributes (class indices)."""
    seed: int
    colour: int
    arms: int
    back: int

    def build(self):
        rng = np.random.default_rng([7, self.seed])
        low, high = BACK_BINS[self.back]
        back_height = low + (high - low) * np.random.default_rng([8, self.seed]).random()
        rgb = np.array(COLOURS[COLOUR_NAMES[self.colour]])
        colours = np.stack([rgb, rgb * 0.9, rgb * LEG_SHADE, rgb])
        return sample_chair(rng, has_arms=bool(self.arms), back_height=back_height, colours=colours)


def direction_bin(azimuth: float) -> int:
    """Azimuth in degrees -> DIRECTIONS index (bins of 45 degrees centred on 0, 45, ...)."""
    return int(np.round((azimuth % 360) / 45)) % len(DIRECTIONS)


def direction_azimuth(direction: int) -> float:
    """The bin's centre in degrees, in (-180, 180]."""
    azimuth = 45.0 * direction
    return azimuth - 360 if azimuth > 180 else azimuth


def sample_toy_chair(rng: np.random.Generator, seed: int, held_out: bool = False) -> ToyChair:
    """Attributes drawn uniformly among the pretraining combinations (or among HELD_OUT_COMBOS)."""
    combos = [c for c in np.ndindex(len(COLOURS), 2, 2) if (tuple(c) in HELD_OUT_COMBOS) == held_out]
    colour, arms, back = combos[rng.integers(len(combos))]
    return ToyChair(seed, int(colour), int(arms), int(back))


def render(chair: ToyChair, azimuth: float, elevation: float, distance: float, resolution: int):
    """-> (RGB uint8 [H,W,3], mask bool [H,W])."""
    image, mask, _ = render_view(chair.build(), azimuth, elevation, distance, resolution)
    return np.asarray(image), np.asarray(mask) > 127


# Caption pieces. Phrases are dropped at random in pretraining so that any subset can be asked
# for (e.g. "a chair in the shape of *s" with no colour); DECOYS teach the text encoder the
# framework's template words and its placeholders' initializer words, so they do not derail it.
PREFIXES = ("a", "a photo of a", "a rendering of a", "a picture of a")
DECOYS = ("in the shape of an object", "with pose", "with appearance texture", "in the style of a rendering",
          "in the shape of a thing", "with pose object")


def caption(colour: int | None = None, arms: int | None = None, back: int | None = None,
            direction: int | None = None, prefix: str = "a", decoy: str | None = None) -> str:
    """'a red chair with arms and a tall back, seen from the left'; None leaves a phrase out."""
    words = [prefix]
    if colour is not None:
        words.append(COLOUR_NAMES[colour])
    words.append("chair")
    if decoy:
        words.append(decoy)
    parts = []
    if arms is not None:
        parts.append("with arms" if arms else "without arms")
    if back is not None:
        parts.append(("and " if parts else "with ") + ("a tall back" if back else "a low back"))
    words += parts
    text = " ".join(words)
    if direction is not None:
        text += ", seen from the " + DIRECTIONS[direction]
    return text


def random_caption(rng: np.random.Generator, labels: dict, keep: float = 0.8, decoy: float = 0.2) -> str:
    """A caption naming each attribute with probability `keep` (the phrase dropped otherwise)."""
    named = {k: (int(v) if rng.random() < keep else None) for k, v in labels.items()}
    return caption(**named, prefix=PREFIXES[rng.integers(len(PREFIXES))],
                   decoy=DECOYS[rng.integers(len(DECOYS))] if rng.random() < decoy else None)


def caption_words() -> list[str]:
    """Every word a ToyWorld caption can use (the tokenizer keeps each as one token)."""
    text = " ".join([*PREFIXES, *DECOYS, *COLOUR_NAMES, *DIRECTIONS,
                     "chair with without arms and a tall low back seen from the"])
    return list(dict.fromkeys(text.replace(",", " , ").split()))


def render_set(num_chairs: int, views_per_chair: int, resolution: int, seed: int, held_out: bool = False,
               progress=None) -> dict:
    """Render chairs at random cameras -> arrays: images uint8 [N,H,W,3], masks bool [N,H,W],
    labels int64 [N,4] (colour, arms, back, direction), cameras float32 [N,3] (az, el, dist),
    chair int64 [N] (index of the chair)."""
    rng = np.random.default_rng([seed, int(held_out)])
    images, masks, labels, cameras, chair_ids = [], [], [], [], []
    for index in range(num_chairs):
        chair = sample_toy_chair(rng, seed=seed * 1_000_003 + index + (500_000 if held_out else 0), held_out=held_out)
        geometry = chair.build()
        for _ in range(views_per_chair):
            azimuth = float(rng.uniform(-180, 180))
            elevation, distance = float(rng.uniform(*ELEVATION_RANGE)), float(rng.uniform(*DISTANCE_RANGE))
            image, mask, _ = render_view(geometry, azimuth, elevation, distance, resolution)
            images.append(np.asarray(image))
            masks.append(np.asarray(mask) > 127)
            labels.append((chair.colour, chair.arms, chair.back, direction_bin(azimuth)))
            cameras.append((azimuth, elevation, distance))
            chair_ids.append(index)
        if progress is not None:
            progress(1)
    return {"images": np.stack(images), "masks": np.stack(masks), "labels": np.array(labels, dtype=np.int64),
            "cameras": np.array(cameras, dtype=np.float32), "chair": np.array(chair_ids, dtype=np.int64)}


# -- ToyWorld objects in the framework's folder format -------------------------------------------
# Cameras shared by every object (so triplet batches find "other object, same camera"), at the
# direction bins' centres; symmetric under azimuth -> -azimuth, so flipped views stay in the pool.
TOY_CAMERA_POOL = tuple((direction_azimuth(d), elevation, 2.5) for elevation in (15.0, 30.0) for d in range(len(DIRECTIONS)))
OBJECT_SEED_OFFSET = 7_000_000     # geometry seeds of folder objects: never a pretraining chair's


def toy_chair_from_meta(meta: dict) -> ToyChair:
    """The ground truth a ToyWorld object folder's meta.json records (KeyError if it has none)."""
    return ToyChair(**meta["shape"]["toyworld"])


def check_new_object_set(out_dir, views: int):
    """-> out_dir as a Path; refuses a folder with files in it and a view count the pool lacks."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; refusing to mix a new set with old files")
    if not 1 <= views <= len(TOY_CAMERA_POOL):
        raise ValueError(f"views must be 1..{len(TOY_CAMERA_POOL)}, got {views}")
    return out_dir


def write_toy_objects(out_dir, num_objects: int = 48, views: int = 8, resolution: int = 32, seed: int = 0):
    """chair_000/ ... in the folder format (views/, masks/, meta.json with cameras and keypoints);
    meta.json's shape.toyworld holds the chair's ground truth, so any pose can be rendered again.
    Each object takes `views` distinct cameras of TOY_CAMERA_POOL; attributes are uniform over
    all 24 combinations."""
    from guided_concepts.objectdata.synthetic import write_chair
    out_dir = check_new_object_set(out_dir, views)
    for index in range(num_objects):
        rng = np.random.default_rng([seed, index, 99])
        colour, arms, back = (int(v) for v in rng.integers((len(COLOURS), 2, 2)))
        chair = ToyChair(OBJECT_SEED_OFFSET + 1000 * seed + index, colour, arms, back)
        geometry = chair.build()
        geometry.shape["toyworld"] = {"seed": chair.seed, "colour": colour, "arms": arms, "back": back}
        geometry.shape["caption"] = caption(colour, arms, back)
        cameras = [TOY_CAMERA_POOL[int(i)] for i in np.sort(rng.choice(len(TOY_CAMERA_POOL), views, replace=False))]
        write_chair(out_dir / f"chair_{index:03d}", geometry, cameras, resolution)
    return out_dir


def ensure_toyworld_data() -> Path:
    """ToyWorld's chairs (48 objects x 8 views at 32 px, with ground truth), in the cache."""
    folder = default_data_dir().parent / "toyworld_chairs_v1"  # bump the version whenever the output changes
    return ensure_generated(folder, write_toy_objects)
