"""ToyWorld 2 data for the framework: fixed object folders (what users have; the held-out
evaluation objects) and a training set rendered on demand, with decoupled pairs.

    data.root: toyworld2 | toyworld2-floor | toyworld2-clutter    (the background level of the views)
    data.rendered_objects: 40                                      train on objects drawn afresh each epoch
    data.decouple: [category]                                      the shape word's masks from another rendering

Decoupled pairs (ShapeWords, Compass Control): the shape head's input (the mask set) is rendered
from the same shape parameters as the target view, but in another category, colour or background,
and from other cameras, as `data.decouple` says; so the only thing the mask set and the target
share is the shape, and the shape word can carry nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guided_concepts.objectdata.dataset import ObjectViewsDataset, resize_pair
from guided_concepts.objectdata.records import ObjectRecord, ViewRecord
from guided_concepts.objectdata.synthetic import (KEYPOINT_FLIP, KEYPOINT_NAMES, camera_basis, default_data_dir,
                                                  ensure_generated, project, render_view)
from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES, TOY_CAMERA_POOL, check_new_object_set
from guided_concepts.toyworld.world2 import BACKGROUNDS, CATEGORIES, WorldObject, build, render
from guided_concepts.toyworld.world2_pretraining import sample_shape

RESOLUTION = 48                       # the world's resolution (docs/toyworld2/README.md)
OBJECT_SEED_OFFSET = 9_000_000        # folder objects' draws: never a pretraining object's
DECOUPLE = ("category", "colour", "background", "camera")
# What a training run may decouple: the mask set's heads see the partner's masks (category and
# camera change them); colour and background never reach a mask, and heads that read pixels read
# the target view itself, so those two would be silently inert there.
TRAINING_DECOUPLE = ("category", "camera")


def draw_object(rng: np.random.Generator, category: int) -> WorldObject:
    colour = COLOUR_NAMES[int(rng.integers(len(COLOURS)))]
    return WorldObject(CATEGORIES[category], sample_shape(rng), COLOURS[colour])


def write_world2_objects(out_dir, num_objects: int = 64, views: int = 8, resolution: int = RESOLUTION,
                         background: int = 0, seed: int = 0) -> Path:
    """object_000/ ... in the folder format (views/, masks/, meta.json with category, cameras,
    keypoints, the ground truth under shape.toyworld2 and each view's background level under
    views.<id>.extra); categories in turn, `views` distinct cameras of TOY_CAMERA_POOL each."""
    out_dir = check_new_object_set(out_dir, views)
    for index in range(num_objects):
        rng = np.random.default_rng([OBJECT_SEED_OFFSET, seed, index])
        obj = draw_object(rng, index % len(CATEGORIES))
        cameras = [TOY_CAMERA_POOL[int(i)] for i in np.sort(rng.choice(len(TOY_CAMERA_POOL), views, replace=False))]
        write_object_folder(out_dir / f"object_{index:03d}", obj, cameras, resolution, background, 1000 * index)
    return out_dir


def write_object_folder(folder: Path, obj: WorldObject, cameras, resolution: int, background: int,
                        background_seed: int) -> None:
    """One object folder: each camera's view, mask and keypoints; meta.json with the ground truth."""
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    geometry, views_meta = build(obj), {}
    for v, camera in enumerate(cameras):
        view_id = f"{v:03d}"
        image, mask = render(obj, *camera, resolution, background, background_seed=background_seed + v)
        keypoints = render_view(geometry, *camera, resolution)[2]
        Image.fromarray(image).save(folder / "views" / f"{view_id}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{view_id}.png")
        views_meta[view_id] = {"azimuth": camera[0], "elevation": camera[1], "distance": camera[2],
                               "keypoints": [[round(float(x), 3), round(float(y), 3)] for x, y in keypoints],
                               "extra": {"background": BACKGROUNDS[background]}}
    meta = {**obj.to_meta(), "keypoint_names": list(KEYPOINT_NAMES), "keypoint_flip": list(KEYPOINT_FLIP),
            "views": views_meta}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_as_other_categories(data_dir, out_dir, resolution: int = RESOLUTION) -> Path:
    """For every ToyWorld 2 object folder in `data_dir`, <out>/<object>/<category>/: the same shape,
    colour and cameras as each other category (decoupled renders: what the object's shape looks like
    as a table, a sofa, ...). tune.py --more-views reads them as more views of the object."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; decoupled renders go to a new folder")
    folders = sorted(f for f in data_dir.iterdir() if (f / "meta.json").is_file()) if data_dir.is_dir() else []
    if not folders:
        raise ValueError(f"{data_dir}: no object folders (with meta.json)")
    for index, folder in enumerate(folders):
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{folder / 'meta.json'}: not JSON ({error})") from None
        if "toyworld2" not in meta.get("shape", {}):
            raise ValueError(f"{folder / 'meta.json'}: no shape.toyworld2 ground truth (not a ToyWorld 2 object)")
        obj = WorldObject.from_meta(meta)
        cameras = [(v["azimuth"], v["elevation"], v["distance"]) for _, v in sorted(meta["views"].items())]
        level = BACKGROUNDS.index(next(iter(meta["views"].values())).get("extra", {}).get("background", "plain"))
        for category in CATEGORIES:
            if category != obj.category:
                write_object_folder(out_dir / folder.name / category, WorldObject(category, obj.shape, obj.colour),
                                    cameras, resolution, level, 1000 * index)
    return out_dir


def ensure_world2_data(background: int = 0) -> Path:
    """ToyWorld 2's objects (64, 16 per category, x 8 views at 48 px; ground truth in meta.json), in the cache."""
    folder = default_data_dir().parent / f"toyworld2_{BACKGROUNDS[background]}_v1"   # bump when the output changes
    return ensure_generated(folder, lambda out: write_world2_objects(out, background=background))


# data.root names of ToyWorld 2's folders -> their background level.
NAMED_SETS = {"toyworld2": 0, "toyworld2-floor": 1, "toyworld2-clutter": 2}


def check_rendered_settings(root, num_objects: int, decouple) -> None:
    """data.rendered_objects / data.decouple against data.root, before anything is scanned or written."""
    if num_objects and root not in NAMED_SETS:
        raise ValueError(f"data.rendered_objects: renders ToyWorld 2 objects; data.root must be one of "
                         f"{', '.join(NAMED_SETS)}, got {root!r}")
    unknown = sorted(set(decouple) - set(TRAINING_DECOUPLE))
    if unknown:
        raise ValueError(f"data.decouple: {', '.join(unknown)} not among {', '.join(TRAINING_DECOUPLE)} (colour and "
                         "background never reach the mask set; heads that read pixels read the target view)")


def rendered_training_set(root: str, num_objects: int, decouple, resolution: int, seed: int, **options):
    """data.rendered_objects > 0: the training set rendered on demand for a ToyWorld 2 data.root."""
    check_rendered_settings(root, num_objects, decouple)
    return RenderedViewsDataset(num_objects, resolution=resolution, seed=seed, decouple=decouple,
                                background=NAMED_SETS[root], **options)


class RenderedViewsDataset(ObjectViewsDataset):
    """ToyWorld 2 objects drawn afresh each epoch and rendered on demand, in ObjectViewsDataset's
    item format. Object slot i keeps its category and cameras (TOY_CAMERA_POOL, so triplet batches
    find the same camera on another object); its shape and colour are drawn from (seed, epoch, i),
    so every epoch trains on new objects; views have background level `background`. The mask set
    (the shape head's input) comes from the slot's partner: the same shape, rendered as `decouple`
    says. Views are rendered at the world's resolution and resized as files of it would be, so
    training sees what the held-out folders give at any data.resolution."""
    on_disk = False

    def __init__(self, num_objects: int, views: int = 8, resolution: int = RESOLUTION, seed: int = 0,
                 decouple=(), background: int = 0, **options):
        unknown = sorted(set(decouple) - set(DECOUPLE))
        if unknown:
            raise ValueError(f"decouple: {', '.join(unknown)} not among {', '.join(DECOUPLE)}")
        if not 1 <= views <= len(TOY_CAMERA_POOL):
            raise ValueError(f"views must be 1..{len(TOY_CAMERA_POOL)}, got {views}")
        if background not in range(len(BACKGROUNDS)):
            raise ValueError(f"background: {background!r} is not a level 0..{len(BACKGROUNDS) - 1}")
        self.decouple, self.background, self.views_per_object = tuple(decouple), background, views
        layout = np.random.default_rng([seed, 41])
        records = []
        for index in range(num_objects):
            cameras = [TOY_CAMERA_POOL[int(i)] for i in np.sort(layout.choice(len(TOY_CAMERA_POOL), views, replace=False))]
            records.append(self._record(f"rendered_{index:05d}", CATEGORIES[index % len(CATEGORIES)], cameras))
        options.setdefault("cache_bytes", 256 << 20)
        super().__init__(records, resolution, seed=seed, **options)
        self._drawn_epoch = 0

    @staticmethod
    def _record(name: str, category: str, cameras) -> ObjectRecord:
        """A record like a scanned folder's; keypoints are placeholders (real ones: _view_keypoints)."""
        views = [ViewRecord(image_path=Path(f"<rendered>/{name}/{v:03d}.png"), mask_path=Path(f"<rendered>/{name}/{v:03d}.png"),
                            azimuth=a, elevation=e, distance=d, view_id=f"{v:03d}",
                            keypoints=[None] * len(KEYPOINT_NAMES))
                 for v, (a, e, d) in enumerate(cameras)]
        return ObjectRecord(name=name, root=Path("<rendered>"), category=category, views=views,
                            keypoint_flip=list(KEYPOINT_FLIP))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if epoch != self._drawn_epoch:       # new objects: nothing cached belongs to them
            self.cache, self.cached_bytes, self._drawn_epoch = {}, 0, epoch

    def pair(self, object_index: int) -> dict:
        """This epoch's draw for a slot: the target object, its partner (the same shape), the
        partner's cameras, and both views' background levels and seeds (drawn once an epoch)."""
        return self._cached(("pair", object_index), lambda: (self._draw_pair(object_index),))[0]

    def _draw_pair(self, object_index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, object_index, 43])
        record = self.records[object_index]
        target = draw_object(rng, CATEGORIES.index(record.category))
        category = target.category
        if "category" in self.decouple:
            category = CATEGORIES[(CATEGORIES.index(category) + 1 + int(rng.integers(len(CATEGORIES) - 1))) % len(CATEGORIES)]
        colour = target.colour
        if "colour" in self.decouple:
            others = [COLOURS[n] for n in COLOUR_NAMES if COLOURS[n] != target.colour]
            colour = others[int(rng.integers(len(others)))]
        cameras = [(v.azimuth, v.elevation, v.distance) for v in record.views]
        if "camera" in self.decouple:        # other cameras of the pool than the target's
            free = [c for c in TOY_CAMERA_POOL if c not in cameras] or list(TOY_CAMERA_POOL)
            cameras = [free[int(i)] for i in rng.choice(len(free), len(cameras), replace=len(free) < len(cameras))]
        levels = [self.background] * len(record.views)
        partner_levels = list(levels)
        if "background" in self.decouple:     # another level than the target's
            partner_levels = [(lv + 1 + int(rng.integers(len(BACKGROUNDS) - 1))) % len(BACKGROUNDS) for lv in levels]
        return {"target": target, "partner": WorldObject(category, target.shape, colour), "partner_cameras": cameras,
                "levels": levels, "partner_levels": partner_levels,
                "seeds": [int(s) for s in rng.integers(1 << 30, size=2 * len(levels))]}

    def _set_record(self, object_index: int) -> ObjectRecord:
        record = self.records[object_index]
        if "camera" not in self.decouple:
            return record
        return self._record(record.name + "_partner", record.category, self.pair(object_index)["partner_cameras"])

    @staticmethod
    def _render(obj: WorldObject, camera, level: int, seed: int):
        """-> image [3,W,W] in [0,1], mask [1,W,W] at the world's resolution W."""
        image, mask = render(obj, *camera, RESOLUTION, level, seed)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.from_numpy(mask)[None].float()

    def _view_pixels(self, object_index: int, view_index: int):
        pair, view = self.pair(object_index), self.records[object_index].views[view_index]
        image, mask = self._render(pair["target"], (view.azimuth, view.elevation, view.distance),
                                   pair["levels"][view_index], pair["seeds"][view_index])
        image, mask = resize_pair(image, mask, self.resolution)                   # [3,R,R], [1,R,R]
        return image, mask, RESOLUTION, (0, 0), (RESOLUTION, RESOLUTION)

    def _view_keypoints(self, object_index: int, view_index: int):
        """The target's 10 keypoints at this view, in the world's pixels (as a folder's meta.json)."""
        view = self.records[object_index].views[view_index]
        position, rotation = camera_basis(view.azimuth, view.elevation, view.distance)
        points, _ = project(build(self.pair(object_index)["target"]).keypoints, position, rotation, RESOLUTION)
        return points.tolist()

    def _partner_view(self, object_index: int, view_index: int):
        """The partner's render (image, mask) for a set view: rendered once an epoch for mask and shading."""
        def draw():
            pair = self.pair(object_index)
            return self._render(pair["partner"], pair["partner_cameras"][view_index],
                                pair["partner_levels"][view_index], pair["seeds"][len(pair["levels"]) + view_index])
        return self._cached(("partner", object_index, view_index), draw)

    def _set_mask(self, object_index: int, view_index: int, res: int) -> torch.Tensor:
        mask = self._partner_view(object_index, view_index)[1]
        return (torch.nn.functional.interpolate(mask[None], size=(res, res), mode="area")[0] > 0.5).float()

    def _set_pixels(self, object_index: int, view_index: int) -> torch.Tensor:
        return resize_pair(*self._partner_view(object_index, view_index), self.resolution)[0]

