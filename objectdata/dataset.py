"""Torch dataset of (object, view) items: square crop, resize and paired flip of image/mask/keypoints."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.transform import hflip
from torch.utils.data import Dataset

from .images import load_mask, load_rgb
from .records import ObjectRecord, data_error


def centre_crop_square(image: torch.Tensor, mask: torch.Tensor, keypoints: torch.Tensor):
    """Crop image [C,H,W] and mask [1,H,W] to their centred S x S square, S = min(H, W).

    keypoints [K,2] are pixel coords (x, y) and are shifted into the crop.
    """
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[:, top:top + side, left:left + side]
    mask = mask[:, top:top + side, left:left + side]
    keypoints = keypoints - torch.tensor([left, top], dtype=keypoints.dtype)
    return image, mask, keypoints


def resize_pair(image: torch.Tensor, mask: torch.Tensor, resolution: int):
    """Resize image [C,S,S] and mask [1,S,S] with one and the same filter so they stay aligned."""
    # torch's antialias=True is the exact area-aware triangle filter (what PIL does);
    # kornia's antialias is an approximate Gaussian pre-blur with reflection padding.
    both = torch.cat([image, mask])[None]  # [1,C+1,S,S]
    both = F.interpolate(both, size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=True)[0]  # [C+1,R,R]
    image = both[:-1].clamp(0.0, 1.0)
    mask = (both[-1:] > 0.5).float()  # re-binarise after blending at edges
    return image, mask


class ObjectViewsDataset(Dataset):
    """One item per (object, view), at `resolution` x `resolution`.

    Flips are drawn from a generator seeded by (seed, epoch, index), so an item is the same
    every time it is read within an epoch, on any worker. Call set_epoch(e) before each
    epoch for fresh flips (with persistent DataLoader workers, the workers keep the old epoch).
    """
    on_disk = True      # its objects are files (a word can be exported per object), not drawn per epoch

    def __init__(self, records: Sequence[ObjectRecord], resolution: int = 64,
                 flip_prob: float = 0.5, seed: int = 0, mask_set_size: int = 0,
                 mask_set_resolution: int = 64, random_set_size: bool = False,
                 cache_bytes: int = 2 << 30, set_shading: bool = False) -> None:
        """mask_set_size > 0 adds each item's object's masks (up to that many views, in random
        order, flipped with the item) for set encoders: "mask_set" [S, 1, r, r], "mask_set_valid"
        [S], "mask_set_camera" [S, 3]. random_set_size draws how many views (1..S) per item, so
        a set encoder also learns from few views. cache_bytes: memory for decoded, resized
        files (each decoded once; 0 = decode on every read). set_shading adds "mask_set_shading"
        [S, 1, r, r]: each set view's brightness inside its mask, standardised per view (the
        shading of the object's parts, without its colour or overall brightness)."""
        if not records:
            raise ValueError("no object records; call scan_objects() on a data folder first")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.records = list(records)
        self.resolution = resolution
        self.mask_set_size = mask_set_size
        self.mask_set_resolution = mask_set_resolution
        self.random_set_size = random_set_size
        self.set_shading = set_shading
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0
        # (object index, view index) per dataset index, objects in record order.
        self.index_pairs = [(o, v) for o, record in enumerate(self.records) for v in range(len(record.views))]
        self.max_keypoints = max(
            (len(view.keypoints) for record in self.records for view in record.views if view.keypoints),
            default=0,
        )
        # Every file is decoded once, at the size training uses (a 4000x3000 photo costs ~1 s to
        # decode and resize; its 64 px result nothing). Up to cache_bytes; past that, read again.
        self.cache: dict = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def _cached(self, key, make):
        """make() once per key while the cache has room; the caller must not modify the result."""
        if key in self.cache:
            return self.cache[key]
        value = make()
        size = sum(t.numel() * t.element_size() for t in value if torch.is_tensor(t))
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[key] = value
            self.cached_bytes += size
        return value

    def _view_pixels(self, object_index: int, view_index: int):
        """-> image [3,R,R], mask [1,R,R] (centre square, resized), the square's side in pixels, its
        corner (left, top) and the file's size (height, width)."""
        view = self.records[object_index].views[view_index]
        image = load_rgb(view.image_path)  # [3,H,W] in [0,1]
        mask = load_mask(view.mask_path) if view.mask_path else torch.ones_like(image[:1])  # [1,H,W]
        if mask.shape[-2:] != image.shape[-2:]:  # records may be hand-built, not scanned
            raise data_error(view.mask_path, f"mask size differs from image {view.image_path}")
        height, width = image.shape[-2:]
        image, mask, _ = centre_crop_square(image, mask, torch.zeros(0, 2))
        side = image.shape[-1]
        image, mask = resize_pair(image, mask, self.resolution)  # [3,R,R], [1,R,R]
        return image, mask, side, ((width - side) // 2, (height - side) // 2), (height, width)

    def __len__(self) -> int:
        return len(self.index_pairs)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def views_of(self, object_index: int) -> list[int]:
        """Dataset indices of all views of one object (for building multi-view batches)."""
        if not 0 <= object_index < len(self.records):
            raise IndexError(f"object_index {object_index} out of range for {len(self.records)} objects")
        return [i for i, (o, _) in enumerate(self.index_pairs) if o == object_index]

    def _should_flip(self, index: int) -> bool:
        return self.will_flip(index, self.epoch)

    def will_flip(self, index: int, epoch: int) -> bool:
        """Whether item `index` is flipped in `epoch` (samplers use it to pair flipped cameras)."""
        if self.flip_prob <= 0:
            return False
        # SeedSequence mixes the three integers into an independent, well-spread seed.
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        return bool(torch.rand((), generator=generator) < self.flip_prob)

    def _view_keypoints(self, object_index: int, view_index: int):
        """A view's keypoints in its file's pixels (None entries unknown), or None."""
        return self.records[object_index].views[view_index].keypoints

    def _padded_keypoints(self, object_index: int, view_index: int):
        """Keypoints -> pixel coords [K_max,2] and validity [K_max], zero-padded."""
        keypoints = torch.zeros(self.max_keypoints, 2)
        valid = torch.zeros(self.max_keypoints, dtype=torch.bool)
        for i, point in enumerate(self._view_keypoints(object_index, view_index) or []):
            if point is not None:
                keypoints[i] = torch.tensor(point)
                valid[i] = True
        return keypoints, valid

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        object_index, view_index = self.index_pairs[index]
        record = self.records[object_index]
        view = record.views[view_index]

        image, mask, side, corner, original = self._cached(("view", object_index, view_index),
                                                           lambda: self._view_pixels(object_index, view_index))
        keypoints, valid = self._padded_keypoints(object_index, view_index)  # [K,2] pixels, [K]
        keypoints = (keypoints - torch.tensor(corner, dtype=keypoints.dtype)) / side  # into the square, [0,1]
        valid &= ((keypoints >= 0) & (keypoints <= 1)).all(dim=-1)  # cropped-away points are unusable

        azimuth = view.azimuth or 0.0
        flipped = self._should_flip(index)
        if flipped:
            image, mask = hflip(image), hflip(mask)
            keypoints[:, 0] = 1.0 - keypoints[:, 0]
            azimuth = -azimuth  # a mirrored view of a symmetric object = camera at -azimuth
            if record.keypoint_flip:  # mirrored "left" points are now the "right" ones
                order = torch.arange(self.max_keypoints)
                order[:len(record.keypoint_flip)] = torch.tensor(record.keypoint_flip)
                keypoints, valid = keypoints[order], valid[order]
        keypoints[~valid] = 0.0

        camera = torch.tensor([azimuth, view.elevation or 0.0, view.distance or 0.0], dtype=torch.float32)
        item = {
            "image": image * 2.0 - 1.0,  # [3,R,R] in [-1,1]
            "mask": mask.clone(),  # [1,R,R] in {0,1} (a copy: the cache keeps its own)
            "has_mask": torch.tensor(view.mask_path is not None),
            "camera": camera,  # [3] (azimuth deg, elevation deg, distance)
            "has_camera": torch.tensor(view.has_camera),
            # A camera that means the same side of every object: cross-object terms use only these.
            "canonical_camera": torch.tensor(view.has_camera and record.frame == "canonical"),
            "keypoints": keypoints,  # [K_max,2] normalised (x right, y down)
            "keypoint_valid": valid,  # [K_max]
            "flipped": torch.tensor(flipped),
            "object_index": torch.tensor(object_index, dtype=torch.int64),
            "view_index": torch.tensor(view_index, dtype=torch.int64),
            "category": record.category,
            "object_name": record.name,
            "view_id": view.view_id,
            # SDXL's size conditioning (time ids): the file's size, and where the square was cut
            # out of it in training pixels (a centre crop: the same after a flip).
            "original_size": torch.tensor(original, dtype=torch.float32),                   # [2] (h, w)
            "crop_top_left": torch.tensor((corner[1], corner[0]), dtype=torch.float32).mul(self.resolution / side).round(),
        }
        if self.mask_set_size > 0:
            item.update(self._mask_set(record, index, flipped, object_index))
        return item

    def _set_record(self, object_index: int) -> ObjectRecord:
        """The views the mask set is drawn from: the object's own (a subclass may give another
        rendering of the same shape)."""
        return self.records[object_index]

    def _set_mask(self, object_index: int, view_index: int, res: int) -> torch.Tensor:
        """A mask of the set: centre square, area-resized to res [1,res,res]."""
        mask = load_mask(self._set_record(object_index).views[view_index].mask_path)
        side = min(mask.shape[-2:])
        top, left = (mask.shape[-2] - side) // 2, (mask.shape[-1] - side) // 2
        mask = mask[:, top:top + side, left:left + side]
        return (F.interpolate(mask[None], size=(res, res), mode="area")[0] > 0.5).float()

    def _mask_set(self, record: ObjectRecord, index: int, flipped: bool, object_index: int) -> dict[str, torch.Tensor]:
        """The object's masks as a padded set, in a random (per item and epoch) order."""
        size, res = self.mask_set_size, self.mask_set_resolution
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index, 1]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        record = self._set_record(object_index)
        order = torch.randperm(len(record.views), generator=generator).tolist()
        count = min(size, len(order))
        if self.random_set_size:
            count = int(torch.randint(1, count + 1, (), generator=generator))
        masks = torch.zeros(size, 1, res, res)
        shading = torch.zeros(size, 1, res, res) if self.set_shading else None
        valid = torch.zeros(size, dtype=torch.bool)
        cameras = torch.zeros(size, 3)
        for slot, v in enumerate(order[:count]):
            view = record.views[v]
            if view.mask_path is None:
                continue
            mask = self._cached(("set", object_index, v, res), lambda: (self._set_mask(object_index, v, res),))[0]
            azimuth = view.azimuth or 0.0
            if shading is not None:
                shade = self._cached(("shading", object_index, v, res),
                                     lambda: (self._set_shading(self._set_pixels(object_index, v), mask),))[0]
                shading[slot] = hflip(shade) if flipped else shade
            if flipped:          # the whole object is mirrored with the item
                mask, azimuth = hflip(mask), -azimuth
            masks[slot], valid[slot] = mask, True
            cameras[slot] = torch.tensor([azimuth, view.elevation or 0.0, view.distance or 0.0])
        out = {"mask_set": masks, "mask_set_valid": valid, "mask_set_camera": cameras}
        if shading is not None:
            out["mask_set_shading"] = shading
        return out

    def _set_pixels(self, object_index: int, view_index: int) -> torch.Tensor:
        """A set view's image [3,R,R] in [0,1]."""
        return self._cached(("view", object_index, view_index), lambda: self._view_pixels(object_index, view_index))[0]

    @staticmethod
    def _set_shading(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image [3,R,R] in [0,1], set mask [1,r,r] -> brightness inside the mask, zero mean and unit
        spread per view [1,r,r] (0 outside)."""
        grey = F.interpolate(image.mean(0, keepdim=True)[None], size=mask.shape[-2:], mode="bilinear",
                             align_corners=False, antialias=True)[0]
        inside = mask > 0
        if inside.sum() < 2:
            return torch.zeros_like(mask)
        values = grey[inside]
        return ((grey - values.mean()) / (values.std() + 1e-3)) * mask


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields into a batch; keep other fields (str) as lists."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
