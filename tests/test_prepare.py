"""`python -m guided_concepts.prepare`: every source format written the way its tools write it, read
back into object folders; cameras round-trip through each convention; masks from alpha, files and
segmenters; bad input refused before anything is written; prepared data trains."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_concepts.objectdata import scan_objects
from guided_concepts.prepare.__main__ import main as prepare
from guided_concepts.prepare.cameras import AXIS_FLIPS, orbit, orbit_c2w
from guided_concepts.prepare.examples import (CAMERAS, random_similarity, views_of, world2_scenes, write_co3d,
                                              write_objaverse, write_photos, write_srn, write_transforms)

def wrap(angle):
    return (np.asarray(angle) + 180.0) % 360.0 - 180.0


def cameras_in(out: Path, name: str) -> np.ndarray:
    meta = json.loads((out / name / "meta.json").read_text())
    return np.array([[v["azimuth"], v["elevation"], v["distance"]] for _, v in sorted(meta["views"].items())])


# -- cameras ---------------------------------------------------------------------------------------
def test_orbit_inverts_orbit_c2w_and_reads_roll_and_off_axis():
    for azimuth, elevation, distance in CAMERAS:
        for roll in (0.0, 12.0, -40.0):
            got = orbit(orbit_c2w(azimuth, elevation, distance, roll))
            assert got["azimuth"] == pytest.approx(azimuth, abs=1e-9)
            assert got["elevation"] == pytest.approx(elevation, abs=1e-9)
            assert got["distance"] == pytest.approx(distance, abs=1e-12)
            assert got["roll"] == pytest.approx(roll, abs=1e-9) and got["off_axis"] == pytest.approx(0, abs=1e-6)
    turned = orbit_c2w(30.0, 10.0, 2.5)
    angle = np.radians(15.0)                           # pan the camera 15 degrees about its up axis
    pan = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    turned[:3, :3] = turned[:3, :3] @ pan
    assert orbit(turned)["off_axis"] == pytest.approx(15.0, abs=1e-6)


@pytest.mark.parametrize("fmt, write, relative", [
    ("transforms", lambda r: write_transforms(r, relative=False), False),
    ("transforms", write_transforms, True),
    ("objaverse", write_objaverse, True),
    ("srn", write_srn, False),
    ("co3d", write_co3d, True),
])
def test_cameras_round_trip_through_every_source_form(tmp_path, fmt, write, relative):
    """Written in the source's convention (its world, its camera axes, c2w or w2c, a capture's own
    rotated and scaled frame), read back as the same orbit: within 1e-6 degrees; a relative frame
    puts azimuth 0 at the first view."""
    src = write(tmp_path / "src")
    out = tmp_path / "out"
    extra = [] if relative or fmt != "transforms" else ["--frame", "canonical"]
    assert prepare([str(src), str(out), "--from", fmt, "--views", "0", "--distance", "0", *extra]) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(names) == 2
    truth = np.array(CAMERAS)
    for o, name in enumerate(names):
        got = cameras_in(out, name)
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["frame"] == ("relative" if relative else "canonical")
        if relative:
            seed = {"transforms": o, "objaverse": 10 + o, "co3d": 20 + o}[fmt]
            scale = random_similarity(seed)[1]
            assert np.abs(wrap(got[:, 0] - wrap(truth[:, 0] - truth[0, 0]))).max() < 1e-6
            assert np.abs(got[:, 2] - scale * truth[:, 2]).max() < 1e-6 * scale
        else:
            assert np.abs(wrap(got[:, 0] - truth[:, 0])).max() < 1e-6
            assert np.abs(got[:, 2] - truth[:, 2]).max() < 1e-9
        assert np.abs(got[:, 1] - truth[:, 1]).max() < 1e-6
    records = scan_objects(out, require_cameras=True)
    assert {r.frame for r in records} == {"relative" if relative else "canonical"}


def test_distances_are_scaled_to_the_asked_median_and_the_scale_is_recorded(tmp_path):
    out = tmp_path / "out"
    assert prepare([str(write_srn(tmp_path / "src")), str(out), "--from", "srn", "--views", "0"]) == 0
    got = cameras_in(out, sorted(p.name for p in out.iterdir() if p.is_dir())[0])
    assert np.median(got[:, 2]) == pytest.approx(2.5)
    meta = json.loads(next(out.glob("*/meta.json")).read_text())
    assert meta["source"]["scale"] == pytest.approx(2.5 / np.median(np.array(CAMERAS)[:, 2]))
    assert meta["source"]["format"] == "srn" and meta["source"]["mask_source"] == ["threshold"]


def test_views_are_spread_round_the_object(tmp_path):
    out = tmp_path / "out"
    assert prepare([str(write_co3d(tmp_path / "src")), str(out), "--from", "co3d", "--views", "3"]) == 0
    for folder in (p for p in out.iterdir() if p.is_dir()):
        azimuths = np.sort(cameras_in(out, folder.name)[:, 0])
        gaps = np.diff(np.concatenate([azimuths, azimuths[:1] + 360]))
        assert len(azimuths) == 3 and gaps.min() > 60          # not three neighbours


def test_roll_and_off_axis_cameras_are_warned_about(tmp_path, capsys):
    src = write_srn(tmp_path / "src", objects=1)
    pose = next((src).glob("*/pose/000002.txt"))
    c2w = orbit_c2w(*CAMERAS[2], roll=25.0)           # SRN's world is the project's: only the axes differ
    c2w[:3, :3] = c2w[:3, :3] * AXIS_FLIPS["opencv"][None, :]
    pose.write_text(" ".join(f"{v:.17g}" for v in c2w.ravel()))
    c2w = orbit_c2w(*CAMERAS[4])                      # panned 15 degrees off the object's centre
    angle = np.radians(15.0)
    c2w[:3, :3] = c2w[:3, :3] @ np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    c2w[:3, :3] = c2w[:3, :3] * AXIS_FLIPS["opencv"][None, :]
    pose.with_name("000004.txt").write_text(" ".join(f"{v:.17g}" for v in c2w.ravel()))
    assert prepare([str(src), str(tmp_path / "out"), "--from", "srn"]) == 0
    err = capsys.readouterr().err
    assert "000002.png: camera roll 25.0 degrees" in err and "000004.png: the camera looks 15.0 degrees away" in err
    assert err.count("warning:") == 2


# -- masks and frames ------------------------------------------------------------------------------
def test_masks_come_from_alpha_files_or_the_segmenter_and_match_the_renders(tmp_path):
    from guided_concepts.prepare.masks import iou
    truth = [m for _, m in views_of(0)]
    for fmt, write, source in (("objaverse", write_objaverse, "alpha"), ("co3d", write_co3d, "file"),
                               ("srn", write_srn, "threshold")):
        out = tmp_path / fmt
        assert prepare([str(write(tmp_path / f"src_{fmt}")), str(out), "--from", fmt, "--views", "0"]) == 0
        first = sorted(p for p in out.iterdir() if p.is_dir())[0]
        assert json.loads((first / "meta.json").read_text())["source"]["mask_source"] == [source]
        for i, expected in enumerate(truth):
            mask = np.asarray(Image.open(first / "masks" / f"{i:03d}.png")) > 127
            # threshold at 48 px: edge pixels are a large share (measured min 0.89)
            assert iou(mask, expected) > (0.999 if source != "threshold" else 0.87), (fmt, i)
        assert (out / "contact_sheet.png").is_file()


def test_threshold_masks_plain_backgrounds_and_not_textured_ones():
    """Bounds from a measurement (these 12 scenes each, 128 px): plain min 0.94 / mean 0.97 (edge
    pixels are what it misses); on a textured floor it takes the floor (mean 0.28), which is what
    grabcut is for."""
    from guided_concepts.prepare.masks import iou, threshold_mask
    plain = [iou(threshold_mask(image), mask) for image, mask in world2_scenes(0)]
    floor = [iou(threshold_mask(image), mask) for image, mask in world2_scenes(1)]
    assert min(plain) > 0.9 and np.mean(plain) > 0.95
    assert np.mean(floor) < 0.5


def test_grabcut_masks_objects_on_a_floor_and_among_clutter():
    """Measured (these 12 scenes each, 128 px): plain min 0.93 / mean 0.96, floor 0.73 / 0.97,
    clutter 0.56 / 0.83 (blocks touching the object join it). Bounds leave ~0.05 of room."""
    from guided_concepts.prepare.masks import grabcut_mask, iou
    if importlib.util.find_spec("cv2") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs the [masks] extra (opencv-python-headless); cv2 is missing")
        pytest.skip("grabcut needs opencv-python-headless (the [masks] extra)")
    scores = {level: [iou(grabcut_mask(image), mask) for image, mask in world2_scenes(level)] for level in range(3)}
    assert min(scores[0]) > 0.88 and np.mean(scores[0]) > 0.92
    assert min(scores[1]) > 0.68 and np.mean(scores[1]) > 0.92
    assert np.mean(scores[2]) > 0.78


def tiny_sam(folder: Path) -> Path:
    import torch
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)
    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4,
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                   iou_head_hidden_dim=32)
    SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(folder)
    return folder


def tiny_segformer(folder: Path) -> Path:
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    torch.manual_seed(0)
    labels = {0: "background", 1: "chair", 2: "floor"}
    SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()})).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_sam_and_pipeline_adapters_run_on_tiny_models(tmp_path):
    """Random weights, built from config: what is checked is the plumbing (the box prompt, the
    best-scored mask, the segment choice, sizes back to the image's), not the masks' quality."""
    import torch
    from guided_concepts.prepare.masks import box_of, segmenter, threshold_mask
    image, _ = next(world2_scenes(0, count=1, resolution=56))
    sam = segmenter(f"sam:{tiny_sam(tmp_path / 'sam')}")
    mask = sam(image)
    assert mask.shape == (56, 56) and mask.dtype == bool
    inputs = sam.processor(images=image, input_boxes=[[[float(v) for v in box_of(threshold_mask(image))]]],
                           return_tensors="pt")
    with torch.no_grad():
        out = sam.model(**inputs)
    every = sam.processor.image_processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                             inputs["reshaped_input_sizes"])[0][0].numpy()
    assert np.array_equal(mask, every[int(out.iou_scores[0, 0].argmax())])
    pipe = segmenter(f"hf:{tiny_segformer(tmp_path / 'seg')}")
    mask = pipe(image)
    segments = [np.asarray(s["mask"]) > 127 for s in pipe.pipe(image)]
    assert mask.shape == (56, 56) and any(np.array_equal(mask, s) for s in segments)
    out = tmp_path / "out"
    src = write_photos(tmp_path / "src", objects=2)
    assert prepare([str(src), str(out), "--from", "photos", "--segmenter", f"sam:{tmp_path / 'sam'}"]) == 0
    assert json.loads((out / "dog0" / "meta.json").read_text())["source"]["mask_source"] == [f"sam:{tmp_path / 'sam'}"]


def test_photos_have_no_cameras_and_train_only_what_needs_none(tmp_path):
    out = tmp_path / "out"
    assert prepare([str(write_photos(tmp_path / "src")), str(out), "--from", "photos", "--category", "dog"]) == 0
    records = scan_objects(out)
    assert [len(r.views) for r in records] == [4, 4] and {r.category for r in records} == {"dog"}
    assert not any(v.has_camera for r in records for v in r.views)


@pytest.mark.parametrize("fmt, write, frame", [("srn", write_srn, "canonical"), ("co3d", write_co3d, "relative")])
def test_prepared_data_trains(tmp_path, tiny_model_dir, fmt, write, frame):
    from guided_concepts import train
    from tests.test_training import args
    out = tmp_path / "data"
    assert prepare([str(write(tmp_path / "src", objects=3)), str(out), "--from", fmt]) == 0
    run = train.main(args(tmp_path / "runs", fmt, "--tokens", "shape,pose", "--set", f"data.root={out}",
                          "--set", "train.steps=2", "--set", "data.holdout=1"))
    assert (run / "checkpoints" / "step_000002").is_dir()
    assert {r.frame for r in scan_objects(out)} == {frame}


def test_relative_frames_are_never_the_same_camera_as_another_object(tmp_path):
    from guided_concepts.objectdata import ObjectViewsDataset, TripletBatchSampler
    out = tmp_path / "out"
    assert prepare([str(write_co3d(tmp_path / "src")), str(out), "--from", "co3d", "--views", "0"]) == 0
    with pytest.warns(UserWarning, match="relative frame"):
        records = scan_objects(out, require_cameras=True)
    dataset = ObjectViewsDataset(records, resolution=32)
    assert not any(bool(dataset[i]["canonical_camera"]) for i in range(len(dataset)))
    assert all(bool(dataset[i]["has_camera"]) for i in range(len(dataset)))
    sampler = TripletBatchSampler(dataset, anchors_per_batch=2)
    assert not sampler.has_camera.any()           # role 2 partners: any other object, not "same camera"


# -- bad input: one line naming the file, nothing written -----------------------------------------
def broken_co3d(root: Path, change) -> Path:
    folder = write_co3d(root, objects=1)
    with gzip.open(folder / "frame_annotations.jgz", "rt") as handle:
        frames = json.load(handle)
    change(frames)
    with gzip.open(folder / "frame_annotations.jgz", "wt") as handle:
        json.dump(frames, handle)
    return folder


def broken_transforms(root: Path, change) -> Path:
    write_transforms(root, objects=1)
    path = root / "scene_0" / "transforms.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    return root


@pytest.mark.parametrize("make, needle", [
    (lambda r: broken_transforms(r, lambda c: c["frames"][1].update(file_path="./images/missing")),
     "frames[1]: frame file"),
    (lambda r: broken_transforms(r, lambda c: c["frames"][2].update(transform_matrix=[[1, 0], [0, 1]])),
     "must be 4x4 or 3x4, got shape (2, 2)"),
    (lambda r: broken_transforms(r, lambda c: c["frames"][0]["transform_matrix"][0].__setitem__(3, float("nan"))),
     "NaN"),
    (lambda r: (r / "empty").mkdir(parents=True) or r / "empty", "no images"),
    (lambda r: broken_transforms(r, lambda c: c["frames"][0].update(file_path=7)), "file_path must be a path string"),
    (lambda r: broken_transforms(r, lambda c: c["frames"][0].update(transform_matrix=[[1, 2], [3]])),
     "not a 4x4 or 3x4 array of numbers"),
    (lambda r: broken_co3d(r, lambda f: f[1]["image"].pop("path")), "[1]: needs image.path"),
    (lambda r: broken_co3d(r, lambda f: f[2].update(sequence_name="../up")), "cannot be a folder name"),
])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, make, needle):
    src = make(tmp_path / "src")
    fmt = "photos" if needle == "no images" else "co3d" if src.name == "chair" else "transforms"
    out = tmp_path / "out"
    assert prepare([str(src), str(out), "--from", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and str(src) in err
    assert not out.exists()


def test_unknown_format_and_existing_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare([str(tmp_path), str(tmp_path / "out"), "--from", "colmap"])
    assert exit_info.value.code == 2 and "invalid choice: 'colmap'" in capsys.readouterr().err
    src, mine = write_photos(tmp_path / "src", objects=1), tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    for force in ([], ["--force"]):                  # a folder prepare did not write: never replaced
        assert prepare([str(src), str(mine), "--from", "photos", *force]) == 2
        assert "was not written by prepare" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    assert prepare([str(src), str(out), "--from", "photos"]) == 0
    (out / "dog0" / "views" / "000.png").unlink()
    assert prepare([str(src), str(out), "--from", "photos"]) == 2
    assert "already holds a prepared set; pass --force" in capsys.readouterr().err
    assert not (out / "dog0" / "views" / "000.png").exists()
    assert prepare([str(src), str(out), "--from", "photos", "--force"]) == 0
    assert (out / "dog0" / "views" / "000.png").is_file()


def test_force_never_replaces_a_source_inside_out_or_files_prepare_did_not_write(tmp_path, capsys):
    out = tmp_path / "data"
    src = write_photos(out / "raw", objects=1)
    assert prepare([str(src), str(out), "--from", "photos", "--force"]) == 2
    assert "holds the source" in capsys.readouterr().err and (src / "dog0").is_dir()
    other = tmp_path / "prepared"
    assert prepare([str(src), str(other), "--from", "photos"]) == 0
    (other / "my_notes.txt").write_text("mine")
    assert prepare([str(src), str(other), "--from", "photos", "--force"]) == 2
    assert "my_notes.txt: was not written by prepare" in capsys.readouterr().err
    assert (other / "my_notes.txt").read_text() == "mine" and (other / "dog0").is_dir()


def test_nerf_synthetic_splits_are_one_object_and_a_dot_source_is_named_after_its_folder(tmp_path, monkeypatch):
    scene = write_transforms(tmp_path / "src", objects=1) / "scene_0"
    content = json.loads((scene / "transforms.json").read_text())
    (scene / "transforms.json").unlink()
    for split, frames in (("train", content["frames"][:4]), ("test", content["frames"][4:])):
        (scene / f"transforms_{split}.json").write_text(json.dumps({**content, "frames": frames}))
    monkeypatch.chdir(scene)
    out = tmp_path / "out"
    assert prepare([".", str(out), "--from", "transforms", "--views", "0", "--distance", "0"]) == 0
    got = cameras_in(out, "scene_0")
    truth = np.array(CAMERAS)[[4, 5, 0, 1, 2, 3]]             # transforms_test.json sorts first
    assert len(got) == 6 and np.abs(wrap(got[:, 0] - wrap(truth[:, 0] - truth[0, 0]))).max() < 1e-6
