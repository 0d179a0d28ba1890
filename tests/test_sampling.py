"""Tests for triplet batches, batch partner matrices, keypoint heatmaps and the shared camera pool."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from guided_concepts.objectdata import (CAMERA_POOL, ObjectRecord, ObjectViewsDataset, TripletBatchSampler, ViewRecord,
                                         collate, generate_chairs, has_keypoints, keypoint_heatmaps, partner_weights,
                                         scan_objects)
from guided_concepts.objectdata import synthetic
from guided_concepts.objectdata.sampling import angular_distance


# ----------------------------------------------------------------------------- helpers

def hand_built(cameras_per_object) -> ObjectViewsDataset:
    """Dataset over records whose image files do not exist: proves the sampler never loads images.

    cameras_per_object: one list per object of (azimuth, elevation) or None (no camera) per view.
    """
    records = []
    for o, cameras in enumerate(cameras_per_object):
        views = [ViewRecord(image_path=Path(f"/nonexistent/obj{o}/views/{v:03d}.png"),
                            azimuth=None if c is None else c[0], elevation=None if c is None else c[1],
                            distance=None if c is None else 2.5)
                 for v, c in enumerate(cameras)]
        records.append(ObjectRecord(name=f"obj{o}", root=Path(f"/nonexistent/obj{o}"), category="thing",
                                    views=views))
    return ObjectViewsDataset(records, resolution=8, flip_prob=0.0)


def triplets(batch: list[int]) -> list[tuple[int, int, int]]:
    assert len(batch) % 3 == 0, batch
    return [tuple(batch[i:i + 3]) for i in range(0, len(batch), 3)]


def view_info(dataset):
    """Per dataset index: object index and (azimuth, elevation) or None."""
    objects, cameras = [], []
    for o, v in dataset.index_pairs:
        view = dataset.records[o].views[v]
        objects.append(o)
        cameras.append((view.azimuth, view.elevation) if view.has_camera else None)
    return objects, cameras


def distance(a, b) -> float:
    return float(angular_distance(a[0], a[1], b[0], b[1]))


def epoch_batches(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.fixture(scope="module")
def pool_set(tmp_path_factory) -> ObjectViewsDataset:
    """The default 12 x 6 camera-pool set (small images: cameras don't depend on resolution)."""
    root = generate_chairs(tmp_path_factory.mktemp("pool") / "set", resolution=16)
    return ObjectViewsDataset(scan_objects(root, require_cameras=True), resolution=16, flip_prob=0.0)


# ----------------------------------------------------------------------------- triplet sampler

def test_triplet_roles_on_the_default_pool_set(pool_set):
    assert len(pool_set.records) == 12 and all(len(r.views) == 6 for r in pool_set.records)
    objects, cameras = view_info(pool_set)
    sampler = TripletBatchSampler(pool_set, anchors_per_batch=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 18  # 72 anchors / 4
    exact = 0
    for batch in batches:
        assert len(batch) == 12
        for anchor, other_view, other_object in triplets(batch):
            assert objects[other_view] == objects[anchor] and other_view != anchor
            assert objects[other_object] != objects[anchor]
            nearest = min(distance(cameras[anchor], cameras[j])
                          for j in range(len(objects)) if objects[j] != objects[anchor])
            assert distance(cameras[anchor], cameras[other_object]) == pytest.approx(nearest)
            exact += cameras[other_object] == cameras[anchor]
    assert exact >= 0.9 * len(pool_set)


@pytest.mark.parametrize("anchors_per_batch, drop_last", [(5, False), (5, True), (72, False), (100, False)])
def test_every_index_is_an_anchor_once_per_epoch(pool_set, anchors_per_batch, drop_last):
    sampler = TripletBatchSampler(pool_set, anchors_per_batch, seed=0, drop_last=drop_last)
    n = len(pool_set)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        anchors = [a for batch in batches for a, _, _ in triplets(batch)]
        assert len(anchors) == len(set(anchors))
        if drop_last:
            assert all(len(b) == 3 * anchors_per_batch for b in batches)
            assert len(anchors) == n - n % anchors_per_batch
        else:
            assert sorted(anchors) == list(range(n))
            assert all(len(b) == 3 * anchors_per_batch for b in batches[:-1])
            assert len(batches[-1]) == 3 * (n - anchors_per_batch * (len(batches) - 1))


def test_deterministic_per_seed_and_epoch(pool_set):
    first, second = TripletBatchSampler(pool_set, 4, seed=3), TripletBatchSampler(pool_set, 4, seed=3)
    assert list(first) == list(first) == list(second)  # re-iterating the same epoch repeats it
    assert epoch_batches(first, 2) == epoch_batches(second, 2)
    per_epoch = [epoch_batches(first, e) for e in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert epoch_batches(TripletBatchSampler(pool_set, 4, seed=4), 0) != per_epoch[0]
    with pytest.raises(ValueError):
        first.set_epoch(-1)
    with pytest.raises(ValueError):
        TripletBatchSampler(pool_set, 0)


def test_works_as_a_dataloader_batch_sampler(pool_set):
    sampler = TripletBatchSampler(pool_set, anchors_per_batch=2, seed=0)
    loader = DataLoader(pool_set, batch_sampler=sampler, collate_fn=collate)
    assert len(loader) == 36
    for step, (indices, batch) in enumerate(zip(sampler, loader)):
        if step == 3:
            break
        assert batch["image"].shape == (6, 3, 16, 16)
        expected = [pool_set.index_pairs[i] for i in indices]
        assert batch["object_index"].tolist() == [o for o, _ in expected]
        assert batch["view_index"].tolist() == [v for _, v in expected]
        same_object, same_camera = partner_weights(batch["object_index"], batch["camera"], batch["has_camera"])
        for t in range(2):
            a, v, c = 3 * t, 3 * t + 1, 3 * t + 2
            assert same_object[a, v] and not same_object[a, c] and not same_camera[a, v]
            exact = bool((batch["camera"][a] == batch["camera"][c]).all())
            assert bool(same_camera[a, c]) == exact  # no flips here, so the records' cameras hold


def test_single_view_and_single_object_datasets():
    single_views = hand_built([[(0.0, 10.0)], [(90.0, 10.0)], [(5.0, 10.0)]])
    for batch in TripletBatchSampler(single_views, 2):
        for a, v, c in triplets(batch):
            assert v == a  # nothing else of this object to show
            assert c == {0: 2, 1: 2, 2: 0}[a]  # nearest other camera: from 90, 5 is 85 away and 0 is 90

    one_object = hand_built([[(0.0, 10.0), (45.0, 10.0), (90.0, 30.0)]])
    for batch in TripletBatchSampler(one_object, 3):
        for a, v, c in triplets(batch):
            assert v != a and c == v  # no other object: the other view stands in

    lonely = hand_built([[(0.0, 10.0)]])
    assert list(TripletBatchSampler(lonely, 4)) == [[0, 0, 0]]


def test_views_without_cameras_pair_with_some_other_object():
    dataset = hand_built([[None, (0.0, 10.0)], [None, None], [(0.0, 10.0), None]])
    objects, _ = view_info(dataset)
    sampler = TripletBatchSampler(dataset, 6)
    seen_for_uncalibrated = set()
    for epoch in range(20):
        for a, v, c in triplets(epoch_batches(sampler, epoch)[0]):
            assert objects[c] != objects[a] and objects[v] == objects[a] and v != a
            if a == 1:
                assert c == 4  # the only other view with a camera, and an exact match
            if a == 0:
                seen_for_uncalibrated.add(c)
    assert seen_for_uncalibrated == {2, 3, 4, 5}  # any other object's view, at random

    nobody_else_calibrated = hand_built([[(0.0, 10.0)], [None, None]])
    for a, v, c in triplets(list(TripletBatchSampler(nobody_else_calibrated, 3))[0]):
        assert (c in (1, 2)) if a == 0 else c == 0


def test_nearest_camera_wraps_around_and_breaks_ties_at_random():
    wrap = hand_built([[(179.0, 10.0)], [(170.0, 10.0)], [(-179.0, 10.0)]])
    sampler = TripletBatchSampler(wrap, 1)
    partner = {a: c for batch in sampler for a, _, c in triplets(batch)}
    assert partner[0] == 2  # 2 degrees across the seam beats 9 degrees the other way
    tie = hand_built([[(0.0, 20.0)], [(10.0, 20.0)], [(-10.0, 20.0)], [(0.0, 30.0), (0.0, 31.0)]])
    sampler = TripletBatchSampler(tie, 6)
    chosen = Counter(c for e in range(40) for a, _, c in triplets(epoch_batches(sampler, e)[0]) if a == 0)
    assert set(chosen) == {1, 2, 3}  # three cameras exactly 10 degrees away, each picked sometimes


def test_sampler_is_instant_on_a_large_dataset():
    rng = np.random.default_rng(0)
    cameras = [[(float(a), float(e)) for a, e in zip(rng.uniform(-180, 180, 16), rng.uniform(0, 40, 16))]
               for _ in range(200)]
    dataset = hand_built(cameras)  # 3200 views
    start = time.perf_counter()
    sampler = TripletBatchSampler(dataset, 8)
    batches = list(sampler)
    assert time.perf_counter() - start < 5.0
    assert len(batches) == 400


# ----------------------------------------------------------------------------- partner matrices

def test_partner_weights_on_a_hand_built_batch():
    object_index = torch.tensor([0, 0, 1, 2, 3])
    camera = torch.tensor([[-179.0, 10.0, 2.5],
                           [-179.0, 10.0, 2.5],  # same object, same camera: a shape pair only
                           [179.0, 10.0, 2.5],  # 2 degrees from the first two across the seam
                           [-179.0, 10.5, 2.0],  # 0.5 degrees from the first two; distance ignored
                           [-179.0, 10.0, 2.5]])  # no camera: never a pose partner
    has_camera = torch.tensor([True, True, True, True, False])
    same_object, same_camera = partner_weights(object_index, camera, has_camera)
    assert same_object.dtype == torch.bool and same_object.shape == (5, 5)
    expected_object = torch.zeros(5, 5, dtype=torch.bool)
    expected_object[0, 1] = expected_object[1, 0] = True
    assert torch.equal(same_object, expected_object)

    def pairs(*ij):
        m = torch.zeros(5, 5, dtype=torch.bool)
        for i, j in ij:
            m[i, j] = m[j, i] = True
        return m

    assert torch.equal(same_camera, pairs((0, 3), (1, 3)))
    # 2 degrees apart across -180/180; 2 vs 3: sqrt(2^2 + 0.5^2) = 2.06.
    _, wider = partner_weights(object_index, camera, has_camera, tolerance_deg=2.05)
    assert torch.equal(wider, pairs((0, 3), (1, 3), (0, 2), (1, 2)))
    _, widest = partner_weights(object_index, camera, has_camera, tolerance_deg=2.1)
    assert torch.equal(widest, pairs((0, 3), (1, 3), (0, 2), (1, 2), (2, 3)))
    _, everyone = partner_weights(object_index, camera, torch.ones(5, dtype=torch.bool), tolerance_deg=2.1)
    assert everyone[4].tolist() == [True, True, True, True, False]  # with a camera, 4 joins in


def test_partner_weights_duplicates_and_bad_shapes():
    same_object, same_camera = partner_weights(torch.tensor([7, 7]), torch.zeros(2, 3),
                                               torch.ones(2, dtype=torch.bool))
    assert same_object.tolist() == [[False, True], [True, False]]  # two samples of one item still pair
    assert not same_camera.any()
    with pytest.raises(ValueError):
        partner_weights(torch.tensor([0, 1]), torch.zeros(3, 3), torch.ones(2, dtype=torch.bool))


# ----------------------------------------------------------------------------- heatmaps

def test_heatmap_peaks_at_the_keypoint_pixel_and_ignores_invalid_points():
    size = 32
    keypoints = torch.tensor([[[5.5 / size, 9.5 / size], [0.9, 0.1]],  # centre of pixel (x=5, y=9); invalid
                              [[0.5, 0.5], [0.2, 0.2]]])  # nothing valid
    valid = torch.tensor([[True, False], [False, False]])
    heatmap = keypoint_heatmaps(keypoints, valid, size)
    assert heatmap.shape == (2, 1, size, size)
    assert heatmap[0, 0, 9, 5] == pytest.approx(1.0)
    assert int(heatmap[0, 0].argmax()) == 9 * size + 5
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    d2 = ((xs + 0.5) / size - 5.5 / size) ** 2 + ((ys + 0.5) / size - 9.5 / size) ** 2
    assert torch.allclose(heatmap[0, 0], torch.exp(-d2 / (2 * 0.06 ** 2)), atol=1e-6)  # invalid point adds nothing
    assert heatmap[0, 0, 3, 29] < 1e-6  # where the invalid keypoint sits
    assert not heatmap[1].any()
    assert has_keypoints(valid).tolist() == [True, False]


def test_heatmap_is_monotone_in_distance_and_takes_the_max():
    size, sigma = 64, 0.1
    keypoints = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])
    heatmap = keypoint_heatmaps(keypoints, torch.tensor([[True, True]]), size, sigma=sigma)[0, 0]
    row = heatmap[31]  # pixel centres y = 31.5/64, just above 0.5
    left = row[16:32]  # from just right of the first peak (x = 0.25 = pixel edge 16) to the middle
    assert (left[1:] < left[:-1]).all()  # strictly falling with distance
    right = row[:16].flip(0)  # from just left of the first peak outwards
    assert (right[1:] < right[:-1]).all()
    assert torch.allclose(row, row.flip(0), atol=1e-6)  # two symmetric blobs, combined by max
    one_sigma = keypoint_heatmaps(torch.tensor([[[0.5 / size + 0.1, 0.5 / size]]]), torch.tensor([[True]]),
                                  size, sigma=sigma)[0, 0, 0, 0]
    assert float(one_sigma) == pytest.approx(math.exp(-0.5), rel=1e-5)
    empty = keypoint_heatmaps(torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.bool), 8)
    assert empty.shape == (3, 1, 8, 8) and not empty.any()
    assert not has_keypoints(torch.zeros(3, 0, dtype=torch.bool)).any()


# ----------------------------------------------------------------------------- shared camera pool

def test_camera_pool_layout():
    assert len(CAMERA_POOL) == 16 and len(set(CAMERA_POOL)) == 16
    azimuths = sorted({a for a, _, _ in CAMERA_POOL})
    assert azimuths == [-157.5 + 45 * i for i in range(8)]
    assert {e for _, e, _ in CAMERA_POOL} == {10.0, 30.0} and {d for _, _, d in CAMERA_POOL} == {2.5}
    assert {(-a, e, d) for a, e, d in CAMERA_POOL} == set(CAMERA_POOL)  # flips stay in the pool


def read_cameras(root: Path) -> list[list[tuple[float, float, float]]]:
    cameras = []
    for meta_path in sorted(root.glob("chair_*/meta.json")):
        views = json.loads(meta_path.read_text())["views"]
        cameras.append([(v["azimuth"], v["elevation"], v["distance"]) for _, v in sorted(views.items())])
    return cameras


def test_pool_is_shared_across_objects(pool_set):
    cameras = [[(v.azimuth, v.elevation, v.distance) for v in r.views] for r in pool_set.records]
    assert cameras == [c for _, c in synthetic.plan_chairs()]  # the planner says what gets written
    users = Counter(camera for per_object in cameras for camera in set(per_object))
    for per_object in cameras:
        assert len(set(per_object)) == 6 and set(per_object) <= set(CAMERA_POOL)
    assert sum(count >= 2 for count in users.values()) >= 12  # most cameras are seen by several chairs
    assert sum(users.values()) / len(users) >= 3
    assert len({tuple(c) for c in cameras}) > 1  # chairs draw their own subsets


def test_pool_generation_is_deterministic_and_per_object(tmp_path):
    first = generate_chairs(tmp_path / "a", num_objects=3, views_per_object=4, resolution=8, seed=5)
    again = generate_chairs(tmp_path / "b", num_objects=3, views_per_object=4, resolution=8, seed=5)
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(first) == files(again)
    # Per-object generators: adding objects keeps the others.
    assert read_cameras(first) == [c for _, c in synthetic.plan_chairs(5, 4, seed=5)][:3]
    assert read_cameras(first) != [c for _, c in synthetic.plan_chairs(3, 4, seed=6)]
    with pytest.raises(ValueError, match="camera pool"):
        generate_chairs(tmp_path / "c", num_objects=1, views_per_object=17, resolution=8)
    assert not (tmp_path / "c").exists()  # validated before anything is written


def test_random_cameras_without_the_pool_and_the_cli(tmp_path):
    plans = synthetic.plan_chairs(4, 20, seed=0, camera_pool=False)  # more views than the pool holds
    cameras = [camera for _, per_object in plans for camera in per_object]
    assert len(set(cameras)) == len(cameras) and not set(cameras) & set(CAMERA_POOL)
    synthetic.main([str(tmp_path / "random"), "--objects", "2", "--views", "3", "--resolution", "8",
                    "--no-camera-pool"])
    random_cameras = [c for per_object in read_cameras(tmp_path / "random") for c in per_object]
    assert len(random_cameras) == 6 and not set(random_cameras) & set(CAMERA_POOL)
    synthetic.main([str(tmp_path / "pool"), "--objects", "2", "--views", "3", "--resolution", "8"])
    assert all(set(c) <= set(CAMERA_POOL) for c in read_cameras(tmp_path / "pool"))
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path / "bad"), "--views", "17", "--resolution", "8"])


def test_triplets_pair_cameras_as_loaded_under_flips(tmp_path):
    """With flips on, the third item is still at the anchor's camera as the batch sees it."""
    from guided_concepts.objectdata import ObjectViewsDataset, TripletBatchSampler, collate, generate_chairs, partner_weights, scan_objects
    root = generate_chairs(tmp_path / "c", num_objects=6, views_per_object=6, resolution=32)
    dataset = ObjectViewsDataset(scan_objects(root), resolution=32, flip_prob=0.5, seed=3)
    sampler = TripletBatchSampler(dataset, anchors_per_batch=4, seed=3)
    matched = total = 0
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for indices in sampler:
            batch = collate([dataset[i] for i in indices])
            _, same_camera = partner_weights(batch["object_index"], batch["camera"], batch["has_camera"])
            for t in range(len(indices) // 3):
                total += 1
                matched += bool(same_camera[3 * t, 3 * t + 2])
    assert any(dataset.will_flip(i, 0) for i in range(len(dataset)))
    assert matched / total >= 0.8, (matched, total)
