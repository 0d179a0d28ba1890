"""Nothing lost: bad input stops before anything is written, Ctrl-C and SIGTERM checkpoint and
exit, a SIGKILL mid-save leaves the previous checkpoint loadable, resume is bit for bit, a
non-finite loss stops the run with the last good checkpoint intact."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.checkpointing import latest_checkpoint, load_checkpoint
from guided_concepts.configs.schema import ConfigError, TrainConfig
from tests.conftest import with_settings

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--set", "train.batch_size=6", "--set", "train.sample_every=0", "--set", "sample.steps=1",
         "--set", "data.holdout=1"]


def run_args(out: Path, name: str, *extra) -> list[str]:
    return with_settings(["--name", name, "--set", f"run.output_dir={out}", *QUICK], *extra)


def metric_lines(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock times (everything else must match exactly)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time")} for line in lines]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_model_dir, chairs_dir):
    """4 steps, a checkpoint every step, keep_last=2, deterministic algorithms on."""
    out = tmp_path_factory.mktemp("runs")
    run = train.main(run_args(out, "short", "--set", "train.steps=4", "--set", "train.checkpoint_every=1",
                              "--set", "train.keep_last=2", "--deterministic"))
    return run, out


# ----------------------------------------------------------------------------------------------
# Bad input: one row per case; each must fail before training with its message, writing nothing
# ----------------------------------------------------------------------------------------------
def copy_chairs(chairs_dir: Path, root: Path, count: int = 3) -> Path:
    for folder in sorted(chairs_dir.iterdir())[:count]:
        shutil.copytree(folder, root / folder.name)
    return root


def edit_meta(root: Path, edit) -> None:
    path = root / "chair_000" / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def without(key):
    def edit(meta):
        del meta["views"]["000"][key]
    return edit


def keypoint_outside(meta):
    meta["views"]["000"]["keypoints"][0] = [999.0, 1.0]


C0 = "chair_000"
# case -> (edit of a 3-chair copy of the data, or None for the bundled data; extra CLI args; message)
BAD_INPUTS = {
    "unreadable image": (lambda r: (r / C0 / "views" / "001.png").write_bytes(b"not a png"), [],
                         rf"{C0}/views/001.png: cannot read image"),
    "truncated image": (lambda r: truncate(r / C0 / "views" / "002.png"), [], rf"{C0}/views/002.png: cannot read image"),
    "non-image file in views/": (lambda r: (r / C0 / "views" / "notes.txt").write_text("x"), [],
                                 rf"{C0}/views/notes.txt: is not an image"),
    "all-empty mask": (lambda r: Image.new("L", (64, 64), 0).save(r / C0 / "masks" / "001.png"), [],
                       rf"{C0}/masks/001.png: mask is empty"),
    "mask size differs from view": (lambda r: Image.new("L", (32, 32), 255).save(r / C0 / "masks" / "001.png"), [],
                                    rf"{C0}/masks/001.png: mask is 32x32 \(WxH\) but image"),
    "mask without a view": (lambda r: shutil.copy(r / C0 / "masks" / "000.png", r / C0 / "masks" / "099.png"), [],
                            rf"{C0}/masks/099.png: has no matching view"),
    "view without a mask": (lambda r: (r / C0 / "masks" / "001.png").unlink(), [], rf"{C0}/views/001.png: has no mask"),
    "meta.json invalid": (lambda r: (r / C0 / "meta.json").write_text("{"), [], rf"{C0}/meta.json: not valid JSON"),
    "meta.json missing, pose needs cameras": (lambda r: (r / C0 / "meta.json").unlink(), ["--tokens", "shape,pose"],
                                              rf"{C0}/meta.json: file is missing \(cameras required\)"),
    "camera missing": (lambda r: edit_meta(r, without("elevation")), ["--tokens", "shape,pose"],
                       rf"{C0}/meta.json: views.000 lacks elevation"),
    "keypoints missing": (lambda r: edit_meta(r, without("keypoints")),
                          ["--tokens", "shape,pose", "--set", "concepts.pose.inputs=[keypoints]"],
                          rf"{C0}/meta.json: views.000 lacks keypoints"),
    "keypoints outside the image": (lambda r: edit_meta(r, keypoint_outside), [],
                                    rf"{C0}/meta.json: views.000.keypoints\[0\] = \[999.0, 1.0\] is outside the 64x64"),
    "empty dataset": (lambda r: shutil.rmtree(r / C0) or [shutil.rmtree(p) for p in r.iterdir()], [],
                      "contains no object folders"),
    "fewer objects than triplet batches need": (lambda r: [shutil.rmtree(p) for p in sorted(r.iterdir())[1:]],
                                                ["--set", "data.holdout=0"], "data.triplets batches need at least 2"),
    "unknown concept": (None, ["--tokens", "shape,posture"], "unknown concept 'posture'"),
    "template without the token's slot": (None, ["--set", "prompt.templates=['a photo of a {category}']"],
                                          r"prompt.templates\[0\] 'a photo of a \{category\}' has no slot for the shape token"),
    "template with an unknown slot": (None, ["--set", "prompt.templates=['a {colour} {phrases}']"],
                                      r"unknown slot \{colour\}"),
    "unknown config key": (None, ["--set", "train.stepz=3"], "unknown key train.stepz; valid keys of train: steps"),
    "wrong config type": (None, ["--set", "train.steps=many"], "train.steps: expected int"),
    "invalid config value": (None, ["--set", "train.lr_schedule=exponential"], "train.lr_schedule: 'exponential'"),
    "model is not an SD folder": (None, ["--model", "{tmp}"], "not a diffusers Stable Diffusion folder"),
    "resolution not divisible by the VAE factor": (None, ["--set", "data.resolution=62"],
                                                   "data.resolution: 62 is not divisible by the VAE's downsampling factor 4"),
    "config file missing": (None, ["--config", "{tmp}/nope.yaml"], "config file not found"),
    # Round two: checked as training will see them, values no run should take, unwritable places.
    "mask empty at the training resolution": (lambda r: one_pixel_mask(r / C0 / "masks" / "001.png"),
                                              ["--set", "data.resolution=16"],
                                              rf"{C0}/masks/001.png: mask is empty at data.resolution 16"),
    "elevation past the pole": (lambda r: edit_meta(r, camera("elevation", 500)), ["--tokens", "shape,pose"],
                                rf"{C0}/meta.json: views.000.elevation must be in \[-90, 90\] degrees, got 500"),
    "azimuth beyond a turn": (lambda r: edit_meta(r, camera("azimuth", 7200)), [],
                              rf"{C0}/meta.json: views.000.azimuth must be in \[-360, 360\]"),
    "mask resolution too small": (None, ["--set", "concepts.shape.mask_resolution=8"],
                                  r"concepts.shape.mask_resolution: 8 is not in \[16, 1024\]"),
    "zero learning rate": (None, ["--set", "concepts.shape.lr=0"], "concepts.shape.lr: a learning rate must be positive"),
    "negative learning rate": (None, ["--set", "tune.lr=-1e-3"], "tune.lr: a learning rate must be positive"),
    "not-a-number value": (None, ["--set", "train.max_grad_norm=.nan"], "train.max_grad_norm: expected a finite number"),
    "not-a-number learning rate as text": (None, ["--set", "concepts.shape.lr=nan"], "concepts.shape.lr: expected a finite number"),
    "infinite value": (None, ["--set", "train.weight_decay=1e999"], "train.weight_decay: expected a finite number"),
    "every object held out": (lambda r: None, ["--set", "data.holdout=3"],
                              r"data.holdout=3 holds out all 3 object\(s\), leaving none to train on"),
    "output folder is a file": (lambda r: (r.parent / "afile").write_text("x"), ["--set", "run.output_dir={tmp}/afile"],
                                r"run.output_dir: .*afile is a file, not a folder"),
    "model folder does not exist": (None, ["--model", "{tmp}/models/sd15"], r"model.name '.*/models/sd15': the folder does not exist"),
    "hub id while offline": (None, ["--model", "someone/sd15"], r"model.name 'someone/sd15': no such folder, and as a hub id it needs the network"),
}


def one_pixel_mask(path: Path) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[30, 30] = 255
    Image.fromarray(mask).save(path)


def camera(key, value):
    def edit(meta):
        meta["views"]["000"][key] = value
    return edit


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_training_and_writes_nothing(case, tmp_path, chairs_dir, tiny_model_dir):
    edit, extra, message = BAD_INPUTS[case]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    if edit is not None:
        root = copy_chairs(chairs_dir, tmp_path / "data")
        edit(root)
        extra += ["--set", f"data.root={root}"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as caught:
        train.main(with_settings(run_args(out, "bad", "--set", "train.steps=1"), *extra))
    import re
    assert re.search(message, str(caught.value)), str(caught.value)
    assert str(caught.value).startswith("error: ")
    assert not out.exists()                                               # no run folder
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before   # nor anything else


ACCEPTED = {   # converted, not rejected
    "RGBA view": lambda p: Image.open(p).convert("RGBA").save(p),
    "greyscale view": lambda p: Image.open(p).convert("L").save(p),
    "16-bit view": lambda p: Image.fromarray((np.asarray(Image.open(p).convert("L"), np.uint16) * 257)).save(p),
}


@pytest.mark.parametrize("case", list(ACCEPTED) + ["non-binary mask"])
def test_unusual_image_modes_are_converted(case, tmp_path, chairs_dir):
    root = copy_chairs(chairs_dir, tmp_path / "data")
    view = root / C0 / "views" / "000.png"
    reference = train.build_data(train.parse_args(["--set", f"data.root={copy_chairs(chairs_dir, tmp_path / 'ref')}",
                                                   "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0])[0][0]
    if case == "non-binary mask":     # a soft (anti-aliased) mask: thresholded at half intensity
        mask = root / C0 / "masks" / "000.png"
        soft = (np.asarray(Image.open(mask).convert("L"), np.float32) * 0.6 + 40).astype(np.uint8)
        Image.fromarray(soft).save(mask)
    else:
        ACCEPTED[case](view)
    cfg = train.parse_args(["--set", f"data.root={root}", "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0]
    item = train.build_data(cfg)[0][0]
    assert item["image"].shape == reference["image"].shape                         # [3, R, R]
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["mask"], reference["mask"])                              # same object pixels
    if case == "RGBA view":
        assert torch.equal(item["image"], reference["image"])                        # opaque alpha: same colours
    elif case != "non-binary mask":                                                  # grey: close in luminance
        grey = reference["image"].mean(0)
        assert (item["image"][0] - grey).abs().mean() < 0.1 and torch.equal(item["image"][0], item["image"][2])


VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [64, 0, 128] * 252 + [224, 224, 192]   # index 255: void


def voc_label_mask(path: Path) -> None:
    """An object at a dark palette index with a light void border, as VOC's label masks are."""
    obj = np.asarray(Image.open(path).convert("L")) > 127
    ring = np.zeros_like(obj)
    ring[1:-1, 1:-1] = (obj[:-2, 1:-1] | obj[2:, 1:-1] | obj[1:-1, :-2] | obj[1:-1, 2:]) & ~obj[1:-1, 1:-1]
    index = np.where(obj, 1, np.where(ring, 255, 0)).astype(np.uint8)
    label = Image.fromarray(index, mode="P")
    label.putpalette(VOC_PALETTE)
    label.save(path)


MASKS_READ = {   # mask encodings read as the object they mean; the rule said when it is not plain
    "palette label mask (VOC)": (voc_label_mask, "palette mask read by index"),
    "0/1 values": (lambda p: Image.fromarray((np.asarray(Image.open(p).convert("L")) > 127).astype(np.uint8)).save(p),
                   "mask stored as 0/1 values"),
    "greyscale saved as palette": (lambda p: Image.open(p).convert("L").convert("P").save(p), None),
    "drawn in colour, adaptive palette": (lambda p: adaptive_palette_mask(p), "either"),
}


def adaptive_palette_mask(path: Path) -> None:
    """A yellow object on black saved with an adaptive palette: whichever index each colour gets,
    the object is read as the object (by index with a black entry 0, else by brightness)."""
    obj = np.asarray(Image.open(path).convert("L")) > 127
    rgb = np.zeros(obj.shape + (3,), np.uint8)
    rgb[obj] = (255, 220, 0)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(path)


@pytest.mark.parametrize("case", list(MASKS_READ))
def test_masks_are_read_by_what_they_encode(case, tmp_path, chairs_dir):
    from guided_concepts.objectdata import DataWarning
    reference = train.build_data(train.parse_args(["--set", f"data.root={copy_chairs(chairs_dir, tmp_path / 'ref')}",
                                                   "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0])[0]
    root = copy_chairs(chairs_dir, tmp_path / "data")
    edit, said = MASKS_READ[case]
    for mask in (root / C0 / "masks").iterdir():
        edit(mask)
    cfg = train.parse_args(["--set", f"data.root={root}", "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0]
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = train.build_data(cfg)[0]
    notes = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    views = len(list((root / C0 / "views").iterdir()))
    for i in range(views):
        assert torch.equal(dataset[i]["mask"], reference[i]["mask"]), i          # the same object pixels
    if said == "either":
        pass
    elif said:
        assert any(said in n and f"{views} mask(s)" in n for n in notes), notes   # and the rule is said
    else:
        assert not notes


def test_a_view_is_read_upright_as_its_exif_orientation_says(tmp_path, chairs_dir):
    """A phone JPEG stores its pixels sideways with an Orientation tag; the mask was drawn on the
    upright image. Read as a viewer shows it, the two match and the pixels are the upright ones."""
    reference = train.build_data(train.parse_args(["--set", f"data.root={copy_chairs(chairs_dir, tmp_path / 'ref')}",
                                                   "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0])[0][0]
    root = copy_chairs(chairs_dir, tmp_path / "data")
    view = root / C0 / "views" / "000.png"
    upright = Image.open(view).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)                # stored 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6                                                      # "rotate 90 clockwise to display"
    sideways.save(view.with_suffix(".jpg"), quality=98, exif=exif)
    view.unlink()
    cfg = train.parse_args(["--set", f"data.root={root}", "--set", "data.holdout=0", "--set", "data.flip_prob=0"])[0]
    item = train.build_data(cfg)[0][0]
    assert torch.equal(item["mask"], reference["mask"])
    assert (item["image"] - reference["image"]).abs().mean() < 0.03           # upright (JPEG-close), not rotated


def test_an_unreadable_data_folder_is_named(tmp_path, chairs_dir, monkeypatch):
    root = copy_chairs(chairs_dir, tmp_path / "data")
    locked = root / C0 / "masks"
    real = Path.iterdir

    def iterdir(self):            # what a folder without read permission does (root ignores chmod)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(tmp_path / "runs", "u", "--set", f"data.root={root}", "--set", "train.steps=1"))
    assert f"{locked}: cannot read the folder (Permission denied)" in str(stopped.value)


def test_an_unwritable_output_folder_stops_before_the_model_loads(tmp_path, monkeypatch):
    from guided_concepts import checkpointing
    loaded = []
    monkeypatch.setattr(train, "load_backbone_for", lambda *a, **k: loaded.append(1))

    def read_only(*args, **kwargs):      # a read-only mount (root ignores chmod)
        raise PermissionError(30, "Read-only file system")
    monkeypatch.setattr(checkpointing.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(tmp_path / "ro", "w", "--set", "train.steps=1"))
    assert f"run.output_dir: cannot write in {tmp_path} (Read-only file system)" in str(stopped.value)
    assert not loaded and not (tmp_path / "ro").exists()


def test_views_smaller_than_the_resolution_and_full_masks_are_warned(tmp_path, chairs_dir):
    from guided_concepts.objectdata import DataWarning, scan_objects
    root = copy_chairs(chairs_dir, tmp_path / "data")
    Image.new("L", (64, 64), 255).save(root / C0 / "masks" / "001.png")
    with pytest.warns(DataWarning) as caught:
        scan_objects(root, resolution=128)
    text = " ".join(str(w.message) for w in caught)
    assert "is upsampled to data.resolution 128" in text
    assert f"{C0}/masks/001.png: the mask covers the whole 128x128 training view" in text


def test_a_run_from_before_samples_per_step_resumes(tmp_path):
    """config.yaml of an older run still has train.samples_per_step (0 from before it was filled in,
    or the value it was filled with): the key left the config for data.json, so it is dropped with a
    warning, not a config change."""
    run = train.main(run_args(tmp_path, "old", "--set", "train.steps=1"))
    config = run / "config.yaml"
    assert json.loads((run / "data.json").read_text())["samples_per_step"] == 6
    for value in (0, 6):
        config.write_text(config.read_text().replace("train:\n", f"train:\n  samples_per_step: {value}\n", 1))
        with pytest.warns(UserWarning, match="train.samples_per_step is no longer a config key"):
            resumed = train.main(["--name", "old", "--set", f"run.output_dir={tmp_path}",
                                  "--set", f"train.steps={2 + value // 6}", "--resume"])
        assert latest_checkpoint(resumed).name == f"step_00000{2 + value // 6}"
        assert "samples_per_step" not in config.read_text()          # the resumed run wrote it without


def test_camera_bounds_are_the_runs_data_not_its_config(tmp_path):
    """The pose word's camera bounds come from the data: data.json records them, config.yaml keeps
    the null the user left, and generation reads the bounds the run trained with. A run from before
    (bounds written into config.yaml, removed size keys still there) resumes with a warning per key."""
    import yaml
    run = train.main(run_args(tmp_path, "cam", "--tokens", "shape,pose", "--set", "train.steps=1"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    derived = json.loads((run / "data.json").read_text())["derived"]["pose"]
    assert saved["concepts"]["pose"]["elevation_range"] is None and saved["concepts"]["pose"]["distance_range"] is None
    assert derived["elevation_range"][0] < derived["elevation_range"][1] and len(derived["distance_range"]) == 2
    system, cfg = generate.load_run(run)
    assert cfg.concepts["pose"].distance_range == derived["distance_range"]
    assert system.heads["pose"].distance_range == derived["distance_range"]
    # A resume keeps the recorded bounds (the heads were trained with them), not the data's of now.
    record = json.loads((run / "data.json").read_text())
    record["derived"]["pose"]["distance_range"] = [2.0, 3.0]
    (run / "data.json").write_text(json.dumps(record))
    train.main(["--name", "cam", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=2", "--resume"])
    assert json.loads((run / "data.json").read_text())["derived"]["pose"]["distance_range"] == [2.0, 3.0]
    assert generate.load_run(run)[1].concepts["pose"].distance_range == [2.0, 3.0]
    # A lost record is refused, not read on the default scale.
    record = json.loads((run / "data.json").read_text())
    del record["derived"]
    (run / "data.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"no 'derived' record; it holds what the run's words took from the data "
                                          r"\(concepts.pose.elevation_range, concepts.pose.distance_range\)"):
        generate.load_run(run)
    # The older layout: bounds in config.yaml, none in data.json, sizes that are constants now.
    saved["concepts"]["pose"].update(derived, heatmap_size=32)
    saved["concepts"]["style"]["gram_channels"] = 8
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.warns(UserWarning) as caught:
        resumed = train.main(["--name", "cam", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=3", "--resume"])
    said = " ".join(str(w.message) for w in caught)
    for key in ("concepts.pose.heatmap_size", "concepts.style.gram_channels"):
        assert f"{key} is no longer a config key" in said
    assert latest_checkpoint(resumed).name == "step_000003"
    assert yaml.safe_load((run / "config.yaml").read_text())["concepts"]["pose"]["distance_range"] == derived["distance_range"]
    text = (run / "config.yaml").read_text().replace("  style:\n", "  style:\n    gram_channels: 16\n", 1)
    (run / "config.yaml").write_text(text)                      # heads of another size: refused, not dropped
    with pytest.raises(ConfigError, match="concepts.style.gram_channels: 16 cannot be set any more"):
        generate.load_run(run)


def test_samples_per_step_is_said_and_recorded(tmp_path, capsys):
    run = train.main(run_args(tmp_path, "b", "--set", "train.batch_size=4", "--set", "train.steps=1"))
    assert "train.batch_size 4 gives 3 samples a step (whole triplets, data.triplets)" in capsys.readouterr().out
    assert json.loads((run / "data.json").read_text())["samples_per_step"] == 3


def test_large_views_are_decoded_once_per_run(tmp_path, chairs_dir, monkeypatch):
    """Every read after the first comes from the decoded, resized copy (a 4000x3000 photo costs ~1 s a decode)."""
    from guided_concepts.objectdata import ObjectViewsDataset, scan_objects
    from guided_concepts.objectdata import dataset as dataset_module
    records = scan_objects(copy_chairs(chairs_dir, tmp_path / "data", count=2))
    decoded = []
    real = dataset_module.load_rgb
    monkeypatch.setattr(dataset_module, "load_rgb", lambda path: decoded.append(path) or real(path))
    dataset = ObjectViewsDataset(records, 32, mask_set_size=4)
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    assert len(decoded) == len(dataset)                                      # once per view, not per read
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask_set"], b["mask_set"]) for a, b in zip(first, again))
    uncached = ObjectViewsDataset(records, 32, mask_set_size=4, cache_bytes=0)
    assert all(torch.equal(uncached[i]["image"], first[i]["image"]) for i in range(len(dataset)))  # same pixels either way


@pytest.mark.parametrize("damaged", ["heads.safetensors", "optimizer.pt", "state.json"])
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_named_and_resume_continues_from_the_newest_intact_one(damaged, tmp_path,
                                                                                             chairs_dir, capsys):
    from guided_concepts.evaluation import __main__ as evaluation_cli
    from guided_concepts import export
    from guided_concepts import tune
    run = train.main(run_args(tmp_path, "d", "--set", "train.steps=4", "--set", "train.checkpoint_every=2"))
    bad = run / "checkpoints" / "step_000004" / damaged
    truncate(bad)
    named = f"{bad}: damaged or unreadable"
    chair = str(chairs_dir / "chair_011")
    readers = (lambda: generate.main(["--run", str(run), "--prompt", "a chair in the shape of *s", "--shape-from", chair,
                                      "--out", str(tmp_path / "g.png"), "--steps", "1"]),
               lambda: export.main(["--run", str(run), "--shape-from", chair, "--out", str(tmp_path / "e")]),
               lambda: tune.main(["--run", str(run), "--object", chair, "--out", str(tmp_path / "t"), "--steps", "1"]),
               lambda: evaluation_cli.main([str(run), "--num", "1", "--steps", "1", "--out", str(tmp_path / "v")]))
    for cli in readers if damaged != "optimizer.pt" else ():     # only resuming reads the optimizer
        with pytest.raises(SystemExit) as stopped:
            cli()
            raise SystemExit("no error")
        assert named in str(stopped.value) and "Traceback" not in str(stopped.value)
    capsys.readouterr()
    resumed = train.main(["--name", "d", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=6", "--resume"])
    said = capsys.readouterr().out
    assert named in said and "resuming from step_000002" in said and "resumed" in said
    assert latest_checkpoint(resumed).name == "step_000006" and load_checkpoint(latest_checkpoint(resumed))[0] == 6
    assert (run / "checkpoints" / "step_000004.damaged" / damaged).exists()          # kept aside, not deleted


def test_resume_with_every_checkpoint_damaged_names_the_files_and_writes_nothing(tmp_path):
    run = train.main(run_args(tmp_path, "dd", "--set", "train.steps=2", "--set", "train.checkpoint_every=1",
                              "--set", "train.keep_last=0"))
    for ckpt in (run / "checkpoints").iterdir():
        truncate(ckpt / "heads.safetensors")
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--name", "dd", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=4", "--resume"])
    message = str(stopped.value)
    assert message.startswith("error: no intact checkpoint to resume from")
    assert "step_000002/heads.safetensors: damaged" in message and "step_000001/heads.safetensors: damaged" in message
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_generation_prompt_with_an_untrained_word(short_run, chairs_dir, tmp_path):
    run, _ = short_run
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit, match=r"uses '\*p', which this run did not train \(trained: \*s\)"):
        generate.main(["--run", str(run), "--prompt", "a chair with pose *p", "--shape-from",
                       str(chairs_dir / "chair_011"), "--steps", "1", "--out", str(out)])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Run folder: environment, keep_last, deterministic, config changes on resume
# ----------------------------------------------------------------------------------------------
def test_run_records_its_environment_and_keeps_the_last_checkpoints(short_run):
    run, _ = short_run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    (record,) = json.loads((run / "environment.json").read_text())
    assert record["packages"]["torch"] == torch.__version__
    assert record["seed"] == 0 and record["device"] == "cpu" and record["deterministic"] is True
    assert record["scheduler"]["class"] == "DDPMScheduler" and "num_train_timesteps" in record["scheduler"]
    assert not torch.are_deterministic_algorithms_enabled()         # the global switch is given back


def test_resume_with_a_changed_config_needs_force(short_run):
    run, out = short_run
    before = (run / "config.yaml").read_text()
    change = ["--set", "losses.shape.mask_weight=0.5", "--set", "train.steps=5"]
    with pytest.raises(SystemExit, match=r"resuming with a different config \(losses.shape.mask_weight: 1.0 -> 0.5\); "
                                         "pass --force"):
        train.main(["--name", "short", "--set", f"run.output_dir={out}", *change, "--resume"])
    assert (run / "config.yaml").read_text() == before
    train.main(["--name", "short", "--set", f"run.output_dir={out}", *change, "--resume", "--force"])
    assert "mask_weight: 0.5" in (run / "config.yaml").read_text()
    assert len(json.loads((run / "environment.json").read_text())) == 2     # one record per start
    assert latest_checkpoint(run).name == "step_000005"


def test_lr_schedules():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    factors = [cfg.lr_factor(s) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and factors[-1] < 0.05
    linear = TrainConfig(steps=10, lr_schedule="linear")
    assert linear.lr_factor(0) == 1.0 and linear.lr_factor(5) == pytest.approx(0.5)
    assert TrainConfig(steps=10).lr_factor(9) == 1.0


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------
RESUME = ["--tokens", "shape,pose", "--set", "train.log_every=2", "--set", "train.checkpoint_every=100",
          "--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=2", "--set", "train.steps=6"]


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    """A run stopped by SIGINT during step 3, then --resume, against 6 straight steps: every
    logged loss and every head weight identical (not close: equal), so heads, optimizer, the
    cosine lr schedule, every RNG, the data position and the half-accumulated log line
    (log_every=2, stopped at 3) all came back."""
    straight = train.main(run_args(tmp_path, "a", *RESUME))
    original, calls = train.training_losses, {"n": 0}

    def interrupt_third_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C in the middle of step 3
        return original(self, *args, **kwargs)
    monkeypatch.setattr(train, "training_losses", interrupt_third_step)
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(tmp_path, "b", *RESUME))
    assert stopped.value.code == 128 + signal.SIGINT
    assert latest_checkpoint(tmp_path / "b").name == "step_000003"
    monkeypatch.setattr(train, "training_losses", original)
    resumed = train.main(["--name", "b", "--set", f"run.output_dir={tmp_path}", "--resume"])
    a, b = metric_lines(straight), metric_lines(resumed)
    assert [r["step"] for r in a] == [2, 4, 6, 6]                   # training lines + final validation
    assert a == b
    final = "checkpoints/step_000006/heads.safetensors"
    ha, hb = load_file(str(straight / final)), load_file(str(resumed / final))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_extending_a_decaying_schedule_needs_force(tmp_path):
    run = train.main(run_args(tmp_path, "c", "--set", "train.steps=2", "--set", "train.lr_schedule=cosine"))
    with pytest.raises(SystemExit, match=r"train.steps: 2 -> 4.*--force"):
        train.main(["--name", "c", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=4", "--resume"])
    assert latest_checkpoint(run).name == "step_000002"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = train.training_losses, {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:                       # the third step: one sample's denoising loss is NaN
            weight, value = terms["denoise"]
            terms["denoise"] = (weight, value.clone().index_fill_(0, torch.tensor([1]), float("nan")))
        return terms

    monkeypatch.setattr(train, "training_losses", poisoned)
    with pytest.raises(SystemExit) as caught:
        train.main(run_args(tmp_path, "nan", "--set", "train.steps=5", "--set", "train.checkpoint_every=2",
                            "--set", "train.log_every=1"))
    message = str(caught.value)
    assert "non-finite loss at step 3 (denoise; samples chair_0" in message and "step_000002" in message
    run = tmp_path / "nan"
    assert latest_checkpoint(run).name == "step_000002"                  # nothing saved from step 3
    assert load_checkpoint(latest_checkpoint(run))[0] == 2
    failure = json.loads((run / "failure.json").read_text())
    assert failure["step"] == 3 and len(failure["samples"]) == 6 and np.isnan(failure["nonfinite"]["denoise"][1])
    assert metric_lines(run)[-1]["nonfinite"].keys() == {"denoise"}
    assert [r["step"] for r in metric_lines(run) if "loss" in r] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Signals, in a real training subprocess
# ----------------------------------------------------------------------------------------------
def start_training(argv: list[str], prelude: str = "") -> subprocess.Popen:
    code = f"{textwrap.dedent(prelude)}\nfrom guided_concepts import train\ntrain.main({argv!r})\n"
    # Its own process group, so a signal can go to the whole group as Ctrl-C in a terminal does.
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Generous waits: a shared 2-core machine running three suites at once is ~10x slower; a test
# only fails on its own outcome, never on how long it took.
PATIENCE_S = 900


def wait_for(condition, process, timeout=PATIENCE_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_loadable(tmp_path):
    marker = tmp_path / "saving"
    prelude = f"""
        import pathlib, time
        from guided_concepts import checkpointing
        original = checkpointing.save_file
        def slow_save(tensors, path, *args, **kwargs):
            original(tensors, path, *args, **kwargs)
            if "step_000004" in str(path):        # halfway through the second checkpoint: wait to be killed
                pathlib.Path({str(marker)!r}).touch()
                time.sleep(300)
        checkpointing.save_file = slow_save
    """
    argv = run_args(tmp_path, "k", "--set", "train.steps=6", "--set", "train.checkpoint_every=2")
    process = start_training(argv, prelude)
    wait_for(marker.exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=PATIENCE_S)
    run = tmp_path / "k"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]
    assert list((run / "checkpoints").glob(".step_000004*"))              # the half-written one is there ...
    assert latest_checkpoint(run).name == "step_000002"                     # ... and never picked
    step, heads, optimizer, _ = load_checkpoint(latest_checkpoint(run))
    assert step == 2 and heads and optimizer["optimizer"]["state"]
    resumed = train.main(["--name", "k", "--set", f"run.output_dir={tmp_path}", "--resume"])
    assert latest_checkpoint(resumed).name == "step_000006"
    assert not list((run / "checkpoints").glob(".*"))                      # resume cleared the debris


@pytest.mark.slow
def test_sigint_checkpoints_exits_and_resumes_bit_for_bit(tmp_path):
    """Ctrl-C at an arbitrary step, to the whole process group (main process and a data-loader
    worker): checkpoint, exit 130; --resume then matches a run that was never interrupted,
    including the metric line the interruption split (log_every=2)."""
    common = ["--set", "train.checkpoint_every=1000", "--set", "train.log_every=2", "--tokens", "shape,pose",
              "--set", "data.num_workers=1"]
    process = start_training(run_args(tmp_path, "i", *common, "--set", "train.steps=400"))
    metrics = tmp_path / "i" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, process)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=PATIENCE_S)
    assert process.returncode == 128 + signal.SIGINT, output
    assert "stopped by SIGINT at step" in output and "Traceback" not in output
    stopped = latest_checkpoint(tmp_path / "i")
    k = load_checkpoint(stopped)[0]
    assert 4 <= k < 400
    total = max(k + 3, 40)                 # 33 batches an epoch: the resumed part crosses into epoch 1
    resumed = train.main(["--name", "i", "--set", f"run.output_dir={tmp_path}", "--set", f"train.steps={total}",
                          "--resume"])
    straight = train.main(run_args(tmp_path, "s", *common, "--set", f"train.steps={total}"))
    assert metric_lines(resumed) == metric_lines(straight)
    final = f"checkpoints/step_{total:06d}/heads.safetensors"
    ha, hb = load_file(str(straight / final)), load_file(str(resumed / final))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_stop_signals_flag_first_and_interrupt_on_second():
    from guided_concepts.checkpointing import StopSignals
    before = signal.getsignal(signal.SIGTERM)
    def settle(done):           # a signal's Python handler runs at the next bytecode; wait for it, with patience
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        settle(lambda: signals.received is not None)
        assert signals.received == signal.SIGTERM          # noted, not raised: the step finishes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            settle(lambda: False)
    assert signal.getsignal(signal.SIGTERM) is before        # handlers given back


def test_forced_resume_that_cannot_load_writes_nothing(short_run):
    run, out = short_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="has no adapters.safetensors but the config has adapters.kind=lora"):
        train.main(["--name", "short", "--set", f"run.output_dir={out}", "--set", "adapters.kind=lora",
                    "--resume", "--force"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_crash_inside_the_run_leaves_no_process_state_behind(tmp_path, monkeypatch):
    """An exception escaping the loop: deterministic mode and accelerate's state are given back,
    so the next run in this process (here with another mixed precision) starts cleanly."""
    def broken_validate(*args, **kwargs):
        raise RuntimeError("validation exploded")
    monkeypatch.setattr(train, "validate", broken_validate)
    with pytest.raises(RuntimeError, match="validation exploded"):
        train.main(run_args(tmp_path, "boom", "--set", "train.steps=1", "--deterministic"))
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.undo()
    run = train.main(run_args(tmp_path, "next", "--set", "train.steps=1", "--set", "model.mixed_precision=bf16"))
    assert json.loads((run / "environment.json").read_text())[0]["mixed_precision"] == "bf16"


def test_a_run_from_before_the_recipe_defaults_still_loads(tmp_path):
    """A run's config.yaml written before a key existed (here the shape word's fixed_norm,
    standardize and logvar_init, and the shape losses' identity_weight, deleted) reads the value the
    run trained with, not today's default, and says so: its heads still load."""
    import re
    from guided_concepts import generate
    run = train.main(run_args(tmp_path, "old", "--set", "train.steps=1"))
    config = run / "config.yaml"
    text = config.read_text()
    for key in ("fixed_norm", "standardize", "logvar_init", "identity_weight"):
        text, count = re.subn(rf"(\n  shape:\n(?:    .*\n)*?)    {key}: .*\n", r"\1", text, count=1)
        assert count == 1, key
    config.write_text(text)
    with pytest.warns(UserWarning, match=r"older version.*concepts.shape.fixed_norm=0.0.*concepts.shape.standardize=False"):
        system, cfg = generate.load_run(run)
    assert cfg.concepts["shape"].standardize is False and cfg.concepts["shape"].fixed_norm == 0.0
    assert cfg.losses["shape"].identity_weight == 0.0
