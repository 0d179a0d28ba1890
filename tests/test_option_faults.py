"""Bad options and foreign checkpoints at generate, export, tune and evaluation: each refused with
one line naming the flag (or the checkpoint and both models) before anything is written, and
before the model loads where the flags alone tell. Also meta.json's unknown keys, and the token
export at the end of a run encoding in bounded batches."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from guided_concepts import export, generate, train, tune, validation
from guided_concepts.checkpointing import latest_checkpoint
from guided_concepts.configs.schema import ConfigError, mask_set_options
from guided_concepts.evaluation.__main__ import main as evaluate_main
from guided_concepts.evaluation.runner import EvalSettings
from guided_concepts.objectdata import ObjectViewsDataset, scan_objects

SHAPE_PROMPT = "a chair in the shape of *s"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, chairs_dir) -> Path:
    """2 steps of shape and pose on the tiny model."""
    out = tmp_path_factory.mktemp("fault_runs")
    return train.main(["--name", "faults", "--set", f"run.output_dir={out}", "--tokens", "shape,pose",
                       "--set", "train.steps=2", "--set", "train.sample_every=0", "--set", "train.batch_size=6",
                       "--set", "data.holdout=1", "--set", "sample.steps=1", "--set", "sample.num_objects=1"])


@pytest.fixture(scope="module")
def foreign_run(run, tmp_path_factory) -> Path:
    """The run's folder with heads of another size in its config (shape MLP 64 wide, not 128),
    and its checkpoint's state.json saying it was trained on another model."""
    folder = tmp_path_factory.mktemp("foreign") / "foreign"
    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["concepts"]["shape"]["hidden_dim"] == 128
    config["concepts"]["shape"]["hidden_dim"] = 64
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state_path = latest_checkpoint(folder) / "state.json"
    state = json.loads(state_path.read_text())
    state["model"] = "tiny-sd15"
    state_path.write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def system(run):
    return generate.load_run(run)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a run's model is loaded: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")
    monkeypatch.setattr(generate, "load_run", refuse)
    monkeypatch.setattr(export, "load_run", refuse)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# 1. --pose: the camera ranges training's data checks use
# ----------------------------------------------------------------------------------------------
BAD_POSES = [
    ("azimuth=1000", r"azimuth must be in \[-360, 360\] degrees, got 1000"),
    ("azimuth=-361", r"azimuth must be in \[-360, 360\] degrees, got -361"),
    ("azimuth=0,elevation=500", r"elevation must be in \[-90, 90\] degrees, got 500"),
    ("azimuth=nan", r"azimuth must be in \[-360, 360\] degrees, got nan"),
    ("azimuth=inf", r"azimuth must be in \[-360, 360\] degrees, got inf"),
    ("azimuth=10,elevation=nan", r"elevation must be in \[-90, 90\] degrees, got nan"),
    ("azimuth=10,distance=0", r"distance must be a finite number > 0, got 0"),
    ("azimuth=10,distance=-2.5", r"distance must be a finite number > 0, got -2.5"),
    ("azimuth=10,distance=inf", r"distance must be a finite number > 0, got inf"),
    ("azimuth=ten", r"azimuth must be a number, got 'ten'"),
]


@pytest.mark.parametrize("pose, message", BAD_POSES)
def test_export_refuses_a_camera_training_would_refuse(run, tmp_path, no_model, pose, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match=rf"^error: --pose '{pose}': {message}$"):
        export.main(["--run", str(run), "--pose", pose, "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("pose, message", BAD_POSES[::3])
def test_generate_refuses_a_camera_training_would_refuse(run, tmp_path, no_model, pose, message):
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit, match=rf"^error: --pose '{pose}': {message}$"):
        generate.main(["--run", str(run), "--prompt", "a chair with pose *p", "--pose", pose, "--steps", "1",
                       "--num", "1", "--out", str(out)])
    assert not out.exists()


def test_cameras_passed_as_values_are_checked_too(run, system, tmp_path):
    net, cfg = system
    nan = {"azimuth": float("nan"), "elevation": 0.0, "distance": None}
    with pytest.raises(ValueError, match=r"^pose camera: azimuth must be in \[-360, 360\] degrees, got nan$"):
        export.export_tokens(run, {"pose": nan}, out_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()
    high = {"azimuth": 30.0, "elevation": 95.0, "distance": None}
    with pytest.raises(ValueError, match=r"^pose camera: elevation must be in \[-90, 90\] degrees, got 95$"):
        generate.generate(net, cfg, "a chair with pose *p", {"pose": high}, num=1, steps=1)
    near = {"azimuth": 30.0, "elevation": 10.0, "distance": 0.0}
    with pytest.raises(ValueError, match=r"^pose camera: distance must be a finite number > 0, got 0$"):
        generate.generate(net, cfg, "a chair with pose *p", {"pose": near}, num=1, steps=1)


# ----------------------------------------------------------------------------------------------
# 2-4. Counts and scales: argparse refuses them (exit code 2, one line naming the flag)
# ----------------------------------------------------------------------------------------------
BAD_SAMPLING = [
    ("--num", "0", "must be a whole number >= 1, got '0'"),
    ("--num", "-3", "must be a whole number >= 1, got '-3'"),
    ("--num", "two", "expected a whole number, got 'two'"),
    ("--steps", "0", "must be a whole number >= 1, got '0'"),
    ("--steps", "-1", "must be a whole number >= 1, got '-1'"),
    ("--guidance-scale", "nan", "must be a finite number, got 'nan'"),
    ("--guidance-scale", "inf", "must be a finite number, got 'inf'"),
    ("--diversity", "-1", "must be a finite number >= 0, got '-1'"),
    ("--diversity", "nan", "must be a finite number, got 'nan'"),
]


def refused_by_argparse(capsys, caught, flag: str, message: str) -> None:
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: argument {flag}: {message}"), err


@pytest.mark.parametrize("flag, value, message", BAD_SAMPLING)
def test_generate_refuses_bad_sampling_flags(run, chairs_dir, tmp_path, capsys, no_model, flag, value, message):
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as caught:
        generate.main(["--run", str(run), "--prompt", SHAPE_PROMPT, "--shape-from", str(chairs_dir / "chair_011"),
                       "--num", "1", "--steps", "1", flag, value, "--out", str(out)])
    refused_by_argparse(capsys, caught, flag, message)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", BAD_SAMPLING[::2])
def test_generate_with_the_base_model_refuses_bad_sampling_flags(tiny_model_dir, tmp_path, capsys, flag, value,
                                                                 message):
    out = tmp_path / "base.png"
    with pytest.raises(SystemExit) as caught:
        generate.main(["--prompt", "a red chair", "--model", str(tiny_model_dir), "--num", "1", "--steps", "1",
                       flag, value, "--out", str(out)])
    refused_by_argparse(capsys, caught, flag, message)
    assert not out.exists()


def test_generate_function_refuses_bad_numbers(system, chairs_dir):
    net, cfg = system
    sources = {"shape": chairs_dir / "chair_011"}
    for kwargs, message in [({"num": 0}, r"^num: must be a whole number >= 1, got 0$"),
                            ({"steps": 0}, r"^steps: must be a whole number >= 1, got 0$"),
                            ({"guidance_scale": math.nan}, r"^guidance_scale: must be a finite number, got nan$"),
                            ({"diversity": -1.0}, r"^diversity: must be a finite number >= 0, got -1.0$")]:
        with pytest.raises(ValueError, match=message):
            generate.generate(net, cfg, SHAPE_PROMPT, sources, **{"num": 1, "steps": 1, **kwargs})


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "must be a whole number >= 1, got '0'"),
    ("--steps", "-2", "must be a whole number >= 1, got '-2'"),
    ("--batch-size", "0", "must be a whole number >= 1, got '0'"),
    ("--grad-accum", "0", "must be a whole number >= 1, got '0'"),
    ("--lr", "nan", "must be a finite number, got 'nan'"),
    ("--lr", "0", "must be a finite number > 0, got '0'"),
])
def test_tune_refuses_bad_counts_before_writing(run, chairs_dir, tmp_path, capsys, no_model, flag, value, message):
    out = tmp_path / "artefact"
    with pytest.raises(SystemExit) as caught:
        tune.main(["--run", str(run), "--object", str(chairs_dir / "chair_011"), flag, value, "--out", str(out)])
    refused_by_argparse(capsys, caught, flag, message)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, r"^steps: must be a whole number >= 1, got 0$"),
    ({"overrides": {"batch_size": 0}}, r"^batch_size: must be a whole number >= 1, got 0$"),
    ({"overrides": {"grad_accum": -1}}, r"^grad_accum: must be a whole number >= 1, got -1$"),
])
def test_tune_object_refuses_bad_counts_before_the_model_loads(run, chairs_dir, tmp_path, no_model, kwargs, message):
    out = tmp_path / "artefact"
    with pytest.raises(ConfigError, match=message):
        tune.tune_object(run, chairs_dir / "chair_011", out_dir=out, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--num", "0"), ("--steps", "0"), ("--num", "-1")])
def test_evaluation_refuses_bad_counts(run, tmp_path, capsys, no_model, flag, value):
    out = tmp_path / "ev"
    with pytest.raises(SystemExit) as caught:
        evaluate_main([str(run), flag, value, "--out", str(out)])
    refused_by_argparse(capsys, caught, flag, f"must be a whole number >= 1, got '{value}'")
    assert not out.exists()
    with pytest.raises(ValueError, match=r"^num: must be a whole number >= 1, got 0$"):
        EvalSettings(num_samples=0)


# ----------------------------------------------------------------------------------------------
# 5. A checkpoint of other heads: one line naming the checkpoint and both models, everywhere
# ----------------------------------------------------------------------------------------------
def mismatch(checkpoint: Path, trained_on: str) -> str:
    return (r"^error: checkpoint heads do not fit this model: shape\.head\.mlp\.\S+ has shape \[128\S*\] in the "
            rf"checkpoint, \[64\S*\] here \(checkpoint {checkpoint} trained on model '{trained_on}' per its "
            r"state\.json; this run's model is 'tiny'\)$")


def test_generate_names_a_checkpoint_that_does_not_fit(foreign_run, run, chairs_dir, tmp_path):
    out = tmp_path / "g.png"
    args = ["--run", str(foreign_run), "--prompt", SHAPE_PROMPT, "--shape-from", str(chairs_dir / "chair_011"),
            "--num", "1", "--steps", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match=mismatch(latest_checkpoint(foreign_run), "tiny-sd15")):
        generate.main(args)
    other = latest_checkpoint(run)              # a checkpoint folder of another run, by --checkpoint
    with pytest.raises(SystemExit, match=mismatch(other, "tiny")):
        generate.main([*args, "--checkpoint", str(other)])
    assert not out.exists()


def test_export_names_a_checkpoint_that_does_not_fit(foreign_run, chairs_dir, tmp_path):
    out = tmp_path / "e"
    with pytest.raises(SystemExit, match=mismatch(latest_checkpoint(foreign_run), "tiny-sd15")):
        export.main(["--run", str(foreign_run), "--shape-from", str(chairs_dir / "chair_011"), "--out", str(out)])
    assert not out.exists()


def test_tune_names_a_checkpoint_that_does_not_fit(foreign_run, chairs_dir, tmp_path):
    out = tmp_path / "artefact"
    with pytest.raises(SystemExit, match=mismatch(latest_checkpoint(foreign_run), "tiny-sd15")):
        tune.main(["--run", str(foreign_run), "--object", str(chairs_dir / "chair_011"), "--steps", "1",
                   "--out", str(out)])
    assert not out.exists()


def test_evaluation_names_a_checkpoint_that_does_not_fit(foreign_run, tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(SystemExit, match=mismatch(latest_checkpoint(foreign_run), "tiny-sd15")):
        evaluate_main([str(foreign_run), "--num", "1", "--steps", "1", "--out", str(out)])
    assert not out.exists()


def test_load_trainable_state_names_the_source(system):
    net, _ = system
    state = net.trainable_state()
    before = {k: v.clone() for k, v in state.items()}
    wrong = {**state, "pose.head.rows": torch.zeros(3, 7)}
    with pytest.raises(ValueError, match=r"^checkpoint heads do not fit this model: pose\.head\.rows has shape "
                                         r"\[3, 7\] in the checkpoint, \[1, \d+\] here \(from somewhere\)$"):
        net.load_trainable_state(wrong, "from somewhere")
    extra = {**state, "colour.head.rows": torch.zeros(1, 8)}
    with pytest.raises(ValueError, match=r"the checkpoint has colour\.head\.rows, which this model lacks"):
        net.load_trainable_state(extra)
    lacking = {k: v for k, v in state.items() if not k.startswith("pose.")}
    with pytest.raises(ValueError, match=r"this model has pose\.\S+, pose\.\S+, pose\.\S+ and \d+ more, "
                                         r"which the checkpoint lacks"):
        net.load_trainable_state(lacking)
    assert all(torch.equal(before[k], v) for k, v in net.trainable_state().items())    # nothing half-loaded


# ----------------------------------------------------------------------------------------------
# 6. meta.json: the keys the project's own writers use stay valid (unknown ones: tests/test_data.py)
# ----------------------------------------------------------------------------------------------
def test_meta_keys_the_project_writes_stay_valid(chairs_dir, tmp_path):
    from guided_concepts.toyworld.world import write_toy_objects
    assert len(scan_objects(chairs_dir)) > 1
    (record,) = scan_objects(write_toy_objects(tmp_path / "toy", num_objects=1, views=2, resolution=16))
    assert len(record.views) == 2
    meta = json.loads((record.root / "meta.json").read_text())
    meta["extra"] = {"source": "my notes"}
    meta["views"]["000"]["extra"] = "a note on one view"
    (record.root / "meta.json").write_text(json.dumps(meta))
    assert scan_objects(tmp_path / "toy")[0].views[0].azimuth == meta["views"]["000"]["azimuth"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(categroy="chair"),
     r"meta\.json: unknown key 'categroy' \(did you mean 'category'\?\); valid keys: category, frame, views, "
     r"keypoint_flip, keypoint_names, shape, source, extra$"),
    (lambda m: m["views"]["000"].update(elevaton=10),
     r"meta\.json: views\.000: unknown key 'elevaton' \(did you mean 'elevation'\?\); valid keys: azimuth, "
     r"elevation, distance, keypoints, extra$"),
])
def test_training_refuses_an_unknown_meta_key_before_writing(chairs_dir, tmp_path, edit, message):
    data = tmp_path / "data"
    for folder in sorted(chairs_dir.iterdir())[:3]:
        shutil.copytree(folder, data / folder.name)
    meta_path = data / "chair_000" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=rf"{data / 'chair_000'}/{message}"):
        train.main(["--name", "x", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", f"data.root={data}",
                    "--set", "train.steps=1", "--set", "data.holdout=1", "--set", "train.batch_size=6",
                    "--set", "train.sample_every=0", "--set", "sample.steps=1"])
    assert not (tmp_path / "runs" / "x").exists()


# ----------------------------------------------------------------------------------------------
# 7. The token export at the end of a run: bounded batches, the same files
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_set(system, chairs_dir):
    _, cfg = system
    return ObjectViewsDataset(scan_objects(chairs_dir)[:5], cfg.data.resolution, flip_prob=0.0,
                              **mask_set_options(cfg))


def test_token_export_encodes_in_bounded_batches(system, export_set, tmp_path, monkeypatch):
    net, _ = system
    sizes = []
    encode = net.encode

    def recording(batch, *args, **kwargs):
        sizes.append(len(batch["object_name"]))
        return encode(batch, *args, **kwargs)
    monkeypatch.setattr(net, "encode", recording)
    validation.export_tokens(net, [export_set], tmp_path, "cpu", batch_size=2)
    assert sizes == [2, 2, 1]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [r.name for r in export_set.records]
    sizes.clear()
    validation.export_tokens(net, [export_set], tmp_path / "default", "cpu")
    assert sizes == [5] and validation.EXPORT_BATCH == 64


def one_batch_export(system, dataset, run_dir: Path) -> None:
    """The export as it was: every object's first view encoded in one batch."""
    batch = validation.first_views(dataset, len(dataset.records))
    with torch.no_grad():
        encoded = system.encode(batch)
    for name, out in encoded.items():
        for b, obj in enumerate(batch["object_name"]):
            validation.save_word(run_dir / "tokens" / obj / f"{name}.safetensors", system.heads[name].config.token,
                                 out.embeds[b], system.table.embedding_dims)


def test_token_export_files_do_not_depend_on_the_batch_bound(system, export_set, tmp_path):
    net, _ = system
    net.heads.eval()
    one_batch_export(net, export_set, tmp_path / "before")
    validation.export_tokens(net, [export_set], tmp_path / "default", "cpu")        # 5 objects: one batch
    validation.export_tokens(net, [export_set], tmp_path / "bound", "cpu", batch_size=2)
    before = files_under(tmp_path / "before")
    assert len(before) == 2 * len(export_set.records)          # shape and pose, per object
    for folder in ("default", "bound"):
        files = files_under(tmp_path / folder)
        assert [p.relative_to(tmp_path / folder) for p in files] == [p.relative_to(tmp_path / "before") for p in before]
    # Up to the bound (64 objects), the files are the old ones byte for byte.
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(before, files_under(tmp_path / "default")))
    # Past it, the same words up to float rounding: CPU matrix products round by batch size (~1e-8).
    for a, b in zip(before, files_under(tmp_path / "bound")):
        old, new = load_file(str(a)), load_file(str(b))
        assert list(old) == list(new) and all(old[k].shape == new[k].shape for k in old)
        assert all(torch.allclose(old[k], new[k], rtol=0, atol=1e-6) for k in old)
