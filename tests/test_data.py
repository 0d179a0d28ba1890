"""Tests for objectdata: folder validation, image decoding, the dataset and synthetic chairs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from guided_concepts.objectdata import (DataError, ObjectViewsDataset, collate, default_data_dir, ensure_default_data,
                                         generate_chairs, load_mask, load_rgb, scan_objects)
from guided_concepts.objectdata import synthetic
from guided_concepts.objectdata.images import mask_array_from_pil, rgb_array_from_pil
from guided_concepts.objectdata.synthetic import KEYPOINT_FLIP, camera_basis, project, render_view, sample_chair


# ----------------------------------------------------------------------------- helpers

def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def make_object(root: Path, name: str = "thing", views: int = 2, size=(16, 16),
                meta: dict | None = None) -> Path:
    """Object folder with grey images and a centred square mask per view."""
    width, height = size
    folder = root / name
    for index in range(views):
        save_png(folder / "views" / f"{index:03d}.png", np.full((height, width, 3), 128, np.uint8))
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
        save_png(folder / "masks" / f"{index:03d}.png", mask)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_meta(folder: Path, meta) -> Path:
    path = folder / "meta.json"
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def chairs(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("chairs") / "set"
    return generate_chairs(out_dir, num_objects=3, views_per_object=3, seed=7)


# ----------------------------------------------------------------------------- bad folders

def _missing_mask(root):
    folder = make_object(root)
    (folder / "masks" / "001.png").unlink()
    return folder / "views" / "001.png"


def _size_mismatch(root):
    folder = make_object(root)
    mask = np.zeros((8, 16), np.uint8)
    mask[2:6, 4:12] = 255
    return save_png(folder / "masks" / "000.png", mask)


def _unreadable_image(root):
    folder = make_object(root)
    path = folder / "views" / "001.png"
    path.write_bytes(b"this is not a png at all")
    return path


def _truncated_image(root):
    folder = make_object(root, size=(64, 64))
    path = folder / "views" / "000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])  # header is fine, pixel data cut short
    return path


def _empty_views(root):
    folder = make_object(root)
    for path in (folder / "views").iterdir():
        path.unlink()
    return folder / "views"


def _no_views_folder(root):
    (root / "thing" / "masks").mkdir(parents=True)
    return root / "thing" / "views"


def _empty_root(root):
    return root


def _missing_root(root):
    return root / "does_not_exist"


def _empty_mask(root):
    folder = make_object(root)
    return save_png(folder / "masks" / "001.png", np.full((16, 16), 100, np.uint8))  # below half: empty


def _bad_json(root):
    return write_meta(make_object(root), '{"category": "chair", "views": {')


def _views_not_dict(root):
    return write_meta(make_object(root), {"views": [1, 2]})


def _azimuth_not_number(root):
    return write_meta(make_object(root), {"views": {"000": {"azimuth": "north"}}})


def _keypoints_not_pairs(root):
    return write_meta(make_object(root), {"views": {"000": {"keypoints": [[1, 2], [3]]}}})


def _category_not_string(root):
    return write_meta(make_object(root), {"category": 5})


def _view_without_image(root):
    return write_meta(make_object(root), {"views": {"007": {"azimuth": 10}}})


def _unknown_top_level_key(root):
    return write_meta(make_object(root), {"categroy": "chair"})


def _unknown_view_key(root):
    return write_meta(make_object(root), {"views": {"000": {"azimuth": 10, "elevaton": 5}}})


def _duplicate_stem(root):
    folder = make_object(root)
    Image.new("RGB", (16, 16)).save(folder / "views" / "000.jpg")
    return folder / "views" / "000.png"  # named as the clashing partner in the message


BAD_FOLDERS = {
    "missing mask": (_missing_mask, "has no mask"),
    "size mismatch": (_size_mismatch, "16x8"),
    "unreadable image": (_unreadable_image, "cannot read image"),
    "truncated image": (_truncated_image, "cannot read image"),
    "empty views folder": (_empty_views, "contains no images"),
    "no views folder": (_no_views_folder, "missing"),
    "empty root": (_empty_root, "no object folders"),
    "missing root": (_missing_root, "does not exist"),
    "empty mask": (_empty_mask, "empty"),
    "bad json": (_bad_json, "not valid JSON"),
    "views not a dict": (_views_not_dict, "views must be"),
    "azimuth not a number": (_azimuth_not_number, "views.000.azimuth"),
    "keypoints not pairs": (_keypoints_not_pairs, "views.000.keypoints[1]"),
    "category not a string": (_category_not_string, "category"),
    "meta view without image": (_view_without_image, "views.007"),
    "unknown meta key": (_unknown_top_level_key, "unknown key 'categroy' (did you mean 'category'?); valid keys: "),
    "unknown view key": (_unknown_view_key, "views.000: unknown key 'elevaton' (did you mean 'elevation'?)"),
    "two images one stem": (_duplicate_stem, "ambiguous"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_raises_data_error_naming_the_file(tmp_path, case):
    build, problem = BAD_FOLDERS[case]
    root = tmp_path / "data"
    root.mkdir()
    offending = build(root)
    with pytest.raises(DataError) as caught:
        scan_objects(root if case != "missing root" else offending)
    message = str(caught.value)
    assert message.startswith(str(offending)), message
    assert problem in message


def test_mask_may_be_missing_when_not_required(tmp_path):
    _missing_mask(tmp_path)
    (record,) = scan_objects(tmp_path, require_masks=False)
    assert [v.mask_path is None for v in record.views] == [False, True]
    item = ObjectViewsDataset([record], resolution=8, flip_prob=0.0)[1]
    assert item["mask"].min() == 1 and not item["has_mask"]


@pytest.mark.parametrize("requirement", ["require_cameras", "require_keypoints"])
def test_required_annotations_must_be_present(tmp_path, requirement):
    folder = make_object(tmp_path, meta={"views": {"000": {"azimuth": 0, "elevation": 10, "distance": 2,
                                                           "keypoints": [[1, 2]]}}})
    with pytest.raises(DataError, match="views.001") as caught:
        scan_objects(tmp_path, **{requirement: True})
    assert str(caught.value).startswith(str(folder / "meta.json"))


def test_missing_meta_gives_defaults_and_required_cameras_name_the_file(tmp_path):
    folder = make_object(tmp_path, name="b_obj", views=1)
    make_object(tmp_path, name="a_obj", views=3)
    records = scan_objects(tmp_path)
    assert [r.name for r in records] == ["a_obj", "b_obj"]  # sorted by folder name
    assert records[1].category == "object" and records[1].views[0].azimuth is None
    assert [v.view_id for v in records[0].views] == ["000", "001", "002"]
    with pytest.raises(DataError) as caught:
        scan_objects(tmp_path, require_cameras=True)
    assert str(caught.value).startswith(str(tmp_path / "a_obj" / "meta.json"))
    assert scan_objects(folder)[0].name == "b_obj"  # a single object folder works as root too


# ----------------------------------------------------------------------------- image decoding

def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], np.uint8)  # [1,3,4]
    image = load_rgb(save_png(tmp_path / "a.png", rgba))
    assert image.shape == (3, 1, 3)
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 0, 1], torch.ones(3))  # fully transparent -> white
    assert torch.allclose(image[:, 0, 2], torch.full((3,), 127 / 255), atol=1e-3)  # half black over white


def test_grey_and_palette_images(tmp_path):
    grey = load_rgb(save_png(tmp_path / "l.png", np.array([[0, 128, 255]], np.uint8)))
    assert torch.allclose(grey, torch.tensor([0.0, 128 / 255, 1.0]).expand(3, 1, 3))
    grey_alpha = load_rgb(save_png(tmp_path / "la.png", np.array([[[0, 0], [0, 255]]], np.uint8), "LA"))
    assert torch.allclose(grey_alpha[:, 0, 0], torch.ones(3)) and grey_alpha[:, 0, 1].max() == 0
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    image = load_rgb(tmp_path / "p.png")
    assert torch.equal(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(image[:, 0, 1], torch.tensor([0.0, 0.0, 1.0]))


def test_sixteen_bit_images_scale_by_full_range(tmp_path):
    path = save_png(tmp_path / "i16.png", np.array([[0, 32768, 65535]], np.uint16))
    assert Image.open(path).mode.startswith("I")
    image = load_rgb(path)
    assert torch.allclose(image[0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1e-4)
    mode_i = Image.fromarray(np.array([[65535, 16384]], np.int32))  # mode "I" (e.g. from TIFF)
    assert np.allclose(rgb_array_from_pil(mode_i)[0, :, 0], [1.0, 0.25], atol=1e-4)


def test_masks_are_binary_whatever_the_mode(tmp_path):
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    expected = torch.tensor([0.0, 0, 0, 1, 1, 1])
    assert torch.equal(load_mask(save_png(tmp_path / "l.png", values))[0, 0], expected)
    rgb = np.repeat(values[..., None], 3, axis=-1)
    assert torch.equal(load_mask(save_png(tmp_path / "rgb.png", rgb))[0, 0], expected)
    # RGBA: a varying alpha is the mask (colour ignored); an opaque one defers to luminance.
    cut_out = np.concatenate([np.zeros_like(rgb), values[..., None]], axis=-1)
    assert torch.equal(load_mask(save_png(tmp_path / "alpha.png", cut_out))[0, 0], expected)
    opaque = np.concatenate([rgb, np.full_like(values[..., None], 255)], axis=-1)
    assert torch.equal(load_mask(save_png(tmp_path / "opaque.png", opaque))[0, 0], expected)
    sixteen = np.array([[0, 20000, 40000, 65535]], np.uint16)
    assert load_mask(save_png(tmp_path / "m16.png", sixteen))[0, 0].tolist() == [0, 0, 1, 1]
    Image.fromarray(values > 127).save(tmp_path / "one.png")  # mode "1"
    one_bit = load_mask(tmp_path / "one.png")
    assert torch.equal(one_bit[0, 0], expected) and one_bit.shape == (1, 1, 6)
    floats = Image.fromarray(np.array([[0.2, 0.7]], np.float32))  # mode "F"
    assert mask_array_from_pil(floats).tolist() == [[False, True]]


# ----------------------------------------------------------------------------- dataset

def make_marked_object(root: Path) -> Path:
    """48x32 image: a red block exactly where the mask is, a green block under one keypoint."""
    image = np.full((32, 48, 3), 255, np.uint8)
    mask = np.zeros((32, 48), np.uint8)
    image[4:12, 10:18] = [255, 0, 0]  # off-centre so a flip moves it
    mask[4:12, 10:18] = 255
    image[18:26, 26:34] = [0, 255, 0]
    folder = root / "marked"
    save_png(folder / "views" / "000.png", image)
    save_png(folder / "masks" / "000.png", mask)
    # (29.0, 21.0) is the centre of pixel (28, 20), inside the green block;
    # keypoint 1 lies in the margin that the square crop removes.
    write_meta(folder, {"category": "toy", "views": {"000": {"azimuth": 30, "elevation": 10, "distance": 2.5,
                                                             "keypoints": [[29.0, 21.0], [2.0, 5.0]]}}})
    return folder


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_image_mask_and_keypoints_stay_aligned(tmp_path, flip_prob):
    records = scan_objects(make_marked_object(tmp_path))
    item = ObjectViewsDataset(records, resolution=16, flip_prob=flip_prob)[0]
    assert bool(item["flipped"]) == (flip_prob == 1.0)
    image, mask = (item["image"] + 1) / 2, item["mask"]  # [3,16,16] in [0,1], [1,16,16]
    assert image.shape == (3, 16, 16) and mask.shape == (1, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    reddish = (image[0] > 0.5) & (image[1] < 0.5)
    assert torch.equal(reddish, mask[0].bool())
    # Crop keeps x in [8, 40); the red block x in [10, 18) -> [1, 5) after halving, mirrored if flipped.
    columns = torch.nonzero(mask[0].any(0)).flatten().tolist()
    assert columns == ([11, 12, 13, 14] if flip_prob else [1, 2, 3, 4])

    x, y = (item["keypoints"][0] * 16).long().tolist()
    assert image[1, y, x] > 0.8 and image[0, y, x] < 0.2  # still on the green block
    assert item["keypoint_valid"].tolist() == [True, False]
    assert item["keypoints"][1].tolist() == [0.0, 0.0]
    expected_azimuth = -30.0 if flip_prob else 30.0
    assert item["camera"].tolist() == pytest.approx([expected_azimuth, 10.0, 2.5])
    assert item["has_camera"] and item["category"] == "toy"


def test_flip_is_reproducible_and_changes_with_epoch(chairs):
    records = scan_objects(chairs)
    dataset = ObjectViewsDataset(records, resolution=32, flip_prob=0.5, seed=3)
    flips = [bool(dataset[i]["flipped"]) for i in range(len(dataset))]
    assert flips == [bool(dataset[i]["flipped"]) for i in range(len(dataset))]
    assert torch.equal(dataset[4]["image"], dataset[4]["image"])
    per_epoch = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        per_epoch.append(tuple(bool(dataset[i]["flipped"]) for i in range(len(dataset))))
    assert len(set(per_epoch)) > 1
    assert any(per_epoch[0]) and not all(per_epoch[0])


def test_flip_swaps_left_right_keypoints_and_mirrors_everything(chairs):
    records = scan_objects(chairs, require_cameras=True, require_keypoints=True)
    plain = ObjectViewsDataset(records, resolution=64, flip_prob=0.0)[2]
    mirrored = ObjectViewsDataset(records, resolution=64, flip_prob=1.0)[2]
    assert torch.equal(mirrored["image"], torch.flip(plain["image"], [-1]))
    assert torch.equal(mirrored["mask"], torch.flip(plain["mask"], [-1]))
    assert mirrored["camera"][0] == -plain["camera"][0]
    assert mirrored["camera"][1:].tolist() == plain["camera"][1:].tolist()
    expected = plain["keypoints"][list(KEYPOINT_FLIP)]
    expected[:, 0] = 1 - expected[:, 0]
    assert torch.allclose(mirrored["keypoints"], expected)


def test_padding_views_of_and_collate_with_dataloader(tmp_path):
    make_object(tmp_path, name="a", views=2, size=(20, 12),
                meta={"views": {"000": {"keypoints": [[5, 1], [10, 11], None]}, "001": {"azimuth": 5}}})
    make_object(tmp_path, name="b", views=1)
    dataset = ObjectViewsDataset(scan_objects(tmp_path), resolution=8, flip_prob=0.0)
    assert len(dataset) == 3 and dataset.max_keypoints == 3
    assert dataset.views_of(0) == [0, 1] and dataset.views_of(1) == [2]
    first = dataset[0]
    assert first["keypoint_valid"].tolist() == [True, True, False]
    # 20x12 is cropped to its central 12x12 (left = 4) before normalising.
    assert torch.allclose(first["keypoints"], torch.tensor([[1 / 12, 1 / 12], [6 / 12, 11 / 12], [0, 0]]))
    no_keypoints = dataset[2]
    assert no_keypoints["keypoints"].shape == (3, 2) and not no_keypoints["keypoint_valid"].any()
    assert dataset[1]["camera"].tolist() == [5.0, 0.0, 0.0] and not dataset[1]["has_camera"]

    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["keypoints"].shape == (3, 3, 2)
    assert batch["object_index"].tolist() == [0, 0, 1] and batch["view_index"].tolist() == [0, 1, 0]
    assert batch["object_index"].dtype == torch.int64
    assert batch["object_name"] == ["a", "a", "b"] and batch["category"] == ["object"] * 3
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    default = next(iter(DataLoader(dataset, batch_size=3)))  # torch's default collate agrees
    assert torch.equal(default["image"], batch["image"]) and default["object_name"] == batch["object_name"]


# ----------------------------------------------------------------------------- synthetic chairs

def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_and_seed_dependent(tmp_path, chairs):
    again = generate_chairs(tmp_path / "again", num_objects=3, views_per_object=3, seed=7)
    assert folder_bytes(again) == folder_bytes(chairs)
    other = generate_chairs(tmp_path / "other", num_objects=3, views_per_object=3, seed=8)
    assert folder_bytes(other).keys() == folder_bytes(chairs).keys()
    assert folder_bytes(other) != folder_bytes(chairs)
    with pytest.raises(FileExistsError):
        generate_chairs(again)  # refuses to mix with an existing set


def test_synthetic_set_matches_the_folder_format(chairs):
    records = scan_objects(chairs, require_masks=True, require_cameras=True, require_keypoints=True)
    assert [r.name for r in records] == ["chair_000", "chair_001", "chair_002"]
    for record in records:
        assert record.category == "chair" and len(record.views) == 3
        cameras = [(v.azimuth, v.elevation, v.distance) for v in record.views]
        assert all(camera in synthetic.CAMERA_POOL for camera in cameras)  # shared pool by default
        assert len(set(cameras)) == 3  # distinct views of one chair
        assert all(-180 <= a < 180 and 5 <= e <= 35 and d > 0 for a, e, d in cameras)
        for view in record.views:
            mask = load_mask(view.mask_path)[0].numpy().astype(bool)  # [64,64]
            assert mask.shape == (64, 64)
            assert 0.08 < mask.mean() < 0.45
            columns = np.flatnonzero(mask.any(0))
            assert 0.3 < (columns[-1] - columns[0] + 1) / 64 < 0.8
            # Every keypoint (occluded or not) lies on the silhouette, within a pixel or two.
            ys, xs = np.nonzero(mask)
            centres = np.stack([xs + 0.5, ys + 0.5], axis=1)
            assert len(view.keypoints) == 10
            for point in view.keypoints:
                assert np.min(np.linalg.norm(centres - np.array(point), axis=1)) < 2.0
            # The background outside the mask is plain white.
            image = load_rgb(view.image_path).numpy()
            assert image[:, ~mask].mean() > 0.97


def test_different_chairs_differ(chairs):
    masks = [load_mask(chairs / f"chair_{i:03d}" / "masks" / "000.png") for i in range(3)]
    images = [load_rgb(chairs / f"chair_{i:03d}" / "views" / "000.png") for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] != masks[j]).float().mean() > 0.02
            assert (images[i] - images[j]).abs().mean() > 0.02


def test_mirrored_camera_renders_the_mirrored_view():
    # Chairs are left/right symmetric: azimuth -a must be the mirror of azimuth a, with
    # left/right keypoints swapped. Checks the camera, projection and pixel conventions together.
    chair = sample_chair(np.random.default_rng(0))
    _, mask, keypoints = render_view(chair, 40.0, 20.0, 2.5, 64)
    _, mirror_mask, mirror_keypoints = render_view(chair, -40.0, 20.0, 2.5, 64)
    flipped = np.asarray(mask)[:, ::-1] > 0
    mirror = np.asarray(mirror_mask) > 0
    assert (flipped & mirror).sum() / (flipped | mirror).sum() > 0.99
    expected = keypoints[list(KEYPOINT_FLIP)].copy()
    expected[:, 0] = 64 - expected[:, 0]
    assert np.allclose(mirror_keypoints, expected, atol=1e-6)


def test_painter_hides_leg_tops_under_the_seat():
    # Seen from above, the tops of the back legs lie under the seat; drawn out of depth
    # order they would show through it. Seat red, legs blue to tell them apart.
    chair = sample_chair(np.random.default_rng(1))
    for index, box in enumerate(chair.boxes):
        box.colour = np.array([1.0, 0, 0]) if index == 0 else np.array([0, 0, 1.0])
    image, _, _ = render_view(chair, 0.0, 30.0, 2.5, 64)
    position, rotation = camera_basis(0.0, 30.0, 2.5)
    for leg in chair.boxes[4:6]:  # back-right, back-left
        top = leg.centre + np.array([0, leg.size[1] / 2, 0])
        pixels, _ = project(top[None], position, rotation, 64)  # [1,2]
        x, y = pixels[0]
        red, _, blue = image.getpixel((int(x), int(y)))
        assert red > 2 * blue + 20, (red, blue)


def test_default_data_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GUIDED_CONCEPTS_DATA", str(tmp_path / "custom"))
    assert default_data_dir() == tmp_path / "custom"
    monkeypatch.delenv("GUIDED_CONCEPTS_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "guided_concepts" / "synthetic_chairs_v2"


def small_set(out_dir):
    return generate_chairs(out_dir, num_objects=2, views_per_object=1, resolution=16)


def test_ensure_default_data_is_idempotent(monkeypatch, tmp_path):
    monkeypatch.setattr(synthetic, "generate_chairs", small_set)
    monkeypatch.setenv("GUIDED_CONCEPTS_DATA", str(tmp_path / "data"))
    path = ensure_default_data()
    assert path == tmp_path / "data"
    assert len(scan_objects(path)) == 2
    marker = path / "chair_000" / "views" / "000.png"
    before = marker.stat().st_mtime_ns
    os.utime(marker, ns=(before - 10**9, before - 10**9))  # make any rewrite detectable
    assert ensure_default_data() == path
    assert marker.stat().st_mtime_ns == before - 10**9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging leftovers


def test_ensure_default_data_leaves_nothing_behind_on_crash(monkeypatch, tmp_path):
    def crash(out_dir):
        small_set(out_dir)
        raise KeyboardInterrupt  # e.g. the user hits ctrl-c half-way

    monkeypatch.setattr(synthetic, "generate_chairs", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_data(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_ensure_default_data_tolerates_a_concurrent_creator(monkeypatch, tmp_path):
    target = tmp_path / "data"

    def race(out_dir):
        small_set(out_dir)
        small_set(target)  # another process finishes first

    monkeypatch.setattr(synthetic, "generate_chairs", race)
    assert ensure_default_data(target) == target
    assert len(scan_objects(target)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
