"""Triplet batches for shape/pose consistency, and the partner matrices the consistency losses use.

TripletBatchSampler yields batches of dataset indices ordered as consecutive triplets

    [a1, v1, c1, a2, v2, c2, ...]      batch[3*t + role], role 0/1/2:

    role 0  a = anchor: every dataset index exactly once per epoch, in a (seed, epoch) shuffle;
    role 1  v = the same object as a, at another view (a itself if the object has one view);
    role 2  c = another object seen from a's camera (the nearest camera among other objects'
            views; ties broken at random); a random other object's view when a has no camera;
            v again when the data set has a single object.

The shape word should agree within (a, v) and the pose word within (a, c). Losses should not rely
on the positions, though: partner_weights() finds every same-object and same-camera pair of a
batch from its own object_index/camera fields, which stays right under flips and duplicates.
"""

from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ShuffledBatchSampler", "TripletBatchSampler", "angular_distance", "partner_weights"]


class ShuffledBatchSampler(Sampler[list[int]]):
    """Plain shuffled batches whose order is a pure function of (seed, epoch), so a resumed run
    sees the same batches it would have seen."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"need a non-empty dataset and batch_size >= 1, got {size} and {batch_size}")
        self.size, self.batch_size, self.seed, self.drop_last, self.epoch = size, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch])).permutation(self.size)
        for start in range(0, self.size, self.batch_size):
            chunk = order[start:start + self.batch_size].tolist()
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk

_TIE_TOLERANCE_DEG = 1e-6  # cameras this close count as equally near (float rounding in meta.json)
_CHUNK = 1024  # anchors per block of the nearest-camera search (bounds memory at ~1024 x N)


def angular_distance(az1, el1, az2, el2):
    """sqrt(daz^2 + del^2) in degrees, azimuth difference wrapped to [-180, 180). numpy or torch."""
    daz = (az1 - az2 + 180.0) % 360.0 - 180.0  # Python-style modulo in both numpy and torch
    return ((daz * daz) + (el1 - el2) ** 2) ** 0.5


def _index_pairs(dataset) -> list[tuple[int, int]]:
    """(object index, view index) per dataset index, from the dataset if it says, else record order."""
    pairs = getattr(dataset, "index_pairs", None)
    if pairs is None:
        pairs = [(o, v) for o, record in enumerate(dataset.records) for v in range(len(record.views))]
    return [(int(o), int(v)) for o, v in pairs]


class TripletBatchSampler(Sampler[list[int]]):
    """Batch sampler of (anchor, same object other view, other object same camera) triplets.

    Use as DataLoader(dataset, batch_sampler=TripletBatchSampler(dataset, 4), collate_fn=collate).
    Each batch holds 3 * anchors_per_batch indices (the last one fewer unless drop_last); see the
    module docstring for the order. Only dataset.records (and dataset.index_pairs when present)
    are read: no image is loaded. Call set_epoch(e) before each epoch for a fresh shuffle; the
    draw is a pure function of (seed, epoch).

    A dataset that flips views turns azimuth a into -a for flipped items. When it exposes
    will_flip(index, epoch), each epoch pairs the cameras as they will be loaded (flipped or not),
    so role 2 is still the same camera.
    """

    def __init__(self, dataset, anchors_per_batch: int, seed: int = 0, drop_last: bool = False) -> None:
        if anchors_per_batch < 1:
            raise ValueError(f"anchors_per_batch must be positive, got {anchors_per_batch}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        super().__init__()
        records = list(dataset.records)
        pairs = _index_pairs(dataset)
        if not pairs:
            raise ValueError("the dataset has no views to sample")
        self.anchors_per_batch = int(anchors_per_batch)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

        n = len(pairs)
        self.object_of = np.array([o for o, _ in pairs], dtype=np.int64)  # [N]
        camera = np.zeros((n, 2))  # [N] (azimuth, elevation) degrees
        has_camera = np.zeros(n, dtype=bool)
        for i, (o, v) in enumerate(pairs):
            view = records[o].views[v]
            # A relative frame's azimuth is its own object's: never "the same camera" as another's.
            if view.has_camera and getattr(records[o], "frame", "canonical") == "canonical":
                camera[i] = (view.azimuth, view.elevation)
                has_camera[i] = True
        self.camera, self.has_camera = camera, has_camera
        self.record_camera = camera.copy()
        self.dataset = dataset
        self._candidates_epoch = None

        by_object: dict[int, list[int]] = {}
        for i, o in enumerate(self.object_of.tolist()):
            by_object.setdefault(o, []).append(i)
        self._views_of = {o: np.array(ids, dtype=np.int64) for o, ids in by_object.items()}
        self.num_objects = len(by_object)
        # Candidates for role 2, per index: the tied-nearest other-object views (or, when the
        # anchor or every other object lacks a camera, all other-object views; None = single object).
        self._same_camera = self._nearest_other_object_views()

    # ------------------------------------------------------------------ precomputation

    def _nearest_other_object_views(self) -> list[np.ndarray | None]:
        n = len(self.object_of)
        if self.num_objects == 1:
            return [None] * n
        all_ids = np.arange(n)
        candidates: list[np.ndarray | None] = [None] * n
        with_camera = np.flatnonzero(self.has_camera)
        for i in np.flatnonzero(~self.has_camera):
            candidates[i] = all_ids[self.object_of != self.object_of[i]]
        for start in range(0, len(with_camera), _CHUNK):
            rows = with_camera[start:start + _CHUNK]  # [C] anchors with a camera
            az, el = self.camera[rows, 0][:, None], self.camera[rows, 1][:, None]
            dist = angular_distance(az, el, self.camera[with_camera, 0][None], self.camera[with_camera, 1][None])
            other = self.object_of[rows][:, None] != self.object_of[with_camera][None]  # [C,M]
            dist = np.where(other, dist, np.inf)
            best = dist.min(axis=1, keepdims=True)  # [C,1]
            near = other & (dist <= best + _TIE_TOLERANCE_DEG)
            for row, i in enumerate(rows):
                ids = with_camera[near[row]]
                # No other object has a camera: any other object's view is as good as another.
                candidates[i] = ids if len(ids) else all_ids[self.object_of != self.object_of[i]]
        return candidates

    # ------------------------------------------------------------------ sampling

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.object_of)
        return n // self.anchors_per_batch if self.drop_last else -(-n // self.anchors_per_batch)

    def triplet(self, anchor: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(anchor, same object other view, other object nearest camera) for one anchor index."""
        views = self._views_of[int(self.object_of[anchor])]
        if len(views) > 1:
            others = views[views != anchor]
            other_view = int(others[rng.integers(len(others))])
        else:
            other_view = int(anchor)
        candidates = self._same_camera[anchor]
        same_camera = other_view if candidates is None else int(candidates[rng.integers(len(candidates))])
        return int(anchor), other_view, same_camera

    def _use_epoch_cameras(self) -> None:
        """Cameras as this epoch loads them (azimuth negated where the dataset flips)."""
        will_flip = getattr(self.dataset, "will_flip", None)
        if will_flip is None or self._candidates_epoch == self.epoch:
            return
        flipped = np.array([will_flip(i, self.epoch) for i in range(len(self.object_of))], dtype=bool)
        camera = self.record_camera.copy()
        camera[flipped, 0] = -camera[flipped, 0]
        if flipped.any() or not np.array_equal(camera, self.camera):
            self.camera = camera
            self._same_camera = self._nearest_other_object_views()
        self._candidates_epoch = self.epoch

    def __iter__(self) -> Iterator[list[int]]:
        self._use_epoch_cameras()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        anchors = rng.permutation(len(self.object_of))
        for start in range(0, len(anchors), self.anchors_per_batch):
            chunk = anchors[start:start + self.anchors_per_batch]
            if self.drop_last and len(chunk) < self.anchors_per_batch:
                return
            batch: list[int] = []
            for anchor in chunk:
                batch.extend(self.triplet(int(anchor), rng))
            yield batch


# ---------------------------------------------------------------------- batch partner matrices

def partner_weights(object_index: torch.Tensor, camera: torch.Tensor, has_camera: torch.Tensor,
                    tolerance_deg: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples of a batch should share a shape word, and which a pose word.

    object_index [B], camera [B,3] (azimuth deg, elevation deg, distance), has_camera [B].
    -> same_object [B,B] bool: i != j and the same object (any views, including the same one);
       same_camera [B,B] bool: i != j, different objects, both with cameras, and
       sqrt(daz^2 + del^2) <= tolerance_deg (daz wrapped, so -179 and 179 are 2 degrees apart).
    Both are symmetric with a False diagonal, on object_index's device.
    """
    if object_index.dim() != 1:
        raise ValueError(f"object_index must be [B], got {tuple(object_index.shape)}")
    b = object_index.shape[0]
    if camera.shape[0] != b or camera.dim() != 2 or camera.shape[1] < 2:
        raise ValueError(f"camera must be [B,3] with B={b}, got {tuple(camera.shape)}")
    if has_camera.shape != (b,):
        raise ValueError(f"has_camera must be [B] with B={b}, got {tuple(has_camera.shape)}")
    device = object_index.device
    camera = camera.to(device=device, dtype=torch.float32)
    has_camera = has_camera.to(device=device, dtype=torch.bool)
    different = ~torch.eye(b, dtype=torch.bool, device=device)
    same = object_index[:, None] == object_index[None, :]
    az, el = camera[:, 0], camera[:, 1]
    distance = angular_distance(az[:, None], el[:, None], az[None, :], el[None, :])  # [B,B]
    both = has_camera[:, None] & has_camera[None, :]
    same_object = same & different
    same_camera = different & ~same & both & (distance <= tolerance_deg)
    return same_object, same_camera


def contrast_partners(object_index: torch.Tensor, camera: torch.Tensor, has_camera: torch.Tensor,
                      generator: torch.Generator | None = None, min_angle_deg: float = 45.0) -> torch.Tensor:
    """For each sample, another sample whose words should differ from its own: a different
    object, seen from a camera at least `min_angle_deg` away where both have cameras (so a pose
    word differs too); failing that any other object; failing that itself.  -> indices [B]"""
    b = object_index.shape[0]
    camera = camera.float().cpu()
    other = object_index.cpu()[:, None] != object_index.cpu()[None, :]
    angle = angular_distance(camera[:, None, 0], camera[:, None, 1], camera[None, :, 0], camera[None, :, 1])
    cams = has_camera.cpu().bool()
    far = other & ((angle >= min_angle_deg) | ~(cams[:, None] & cams[None, :]))
    choice = torch.rand(b, b, generator=generator)                      # random pick among candidates
    partners = []
    for i in range(b):
        candidates = far[i] if far[i].any() else other[i]
        partners.append(int(torch.where(candidates, choice[i], -1.0).argmax()) if candidates.any() else i)
    return torch.tensor(partners, device=object_index.device)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C (sent to the whole process group) and SIGTERM are the
    main process's to handle (checkpoint, then stop); a worker dying of them first would turn a
    clean stop into a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
