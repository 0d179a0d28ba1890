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

import generate
import train
from checkpointing import latest_checkpoint, load_checkpoint
from configs.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--set", "train.batch_size=6", "--set", "train.sample_every=0", "--set", "sample.steps=1",
         "--set", "data.holdout=1"]


def run_args(out: Path, name: str, *extra) -> list[str]:
    return ["--name", name, "--set", f"run.output_dir={out}", *QUICK, *extra]


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
}


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
        train.main(run_args(out, "bad", "--set", "train.steps=1", *extra))
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
    from system import GuidedConcepts
    straight = train.main(run_args(tmp_path, "a", *RESUME))
    original, calls = GuidedConcepts.training_losses, {"n": 0}

    def interrupt_third_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C in the middle of step 3
        return original(self, *args, **kwargs)
    monkeypatch.setattr(GuidedConcepts, "training_losses", interrupt_third_step)
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(tmp_path, "b", *RESUME))
    assert stopped.value.code == 128 + signal.SIGINT
    assert latest_checkpoint(tmp_path / "b").name == "step_000003"
    monkeypatch.setattr(GuidedConcepts, "training_losses", original)
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
    from system import GuidedConcepts
    original, calls = GuidedConcepts.training_losses, {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:                       # the third step: one sample's denoising loss is NaN
            weight, value = terms["denoise"]
            terms["denoise"] = (weight, value.clone().index_fill_(0, torch.tensor([1]), float("nan")))
        return terms

    monkeypatch.setattr(GuidedConcepts, "training_losses", poisoned)
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
    code = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{textwrap.dedent(prelude)}\nimport train\ntrain.main({argv!r})\n"
    # Its own process group, so a signal can go to the whole group as Ctrl-C in a terminal does.
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.1)


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_loadable(tmp_path):
    marker = tmp_path / "saving"
    prelude = f"""
        import pathlib, time, checkpointing
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
    process.wait(timeout=30)
    run = tmp_path / "k"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]
    assert list((run / "checkpoints").glob(".step_000004*"))              # the half-written one is there ...
    assert latest_checkpoint(run).name == "step_000002"                     # ... and never picked
    step, heads, optimizer, _ = load_checkpoint(latest_checkpoint(run))
    assert step == 2 and heads and optimizer["optimizer"]["state"]
    resumed = train.main(["--name", "k", "--set", f"run.output_dir={tmp_path}", "--resume"])
    assert latest_checkpoint(resumed).name == "step_000006"
    assert not list((run / "checkpoints").glob(".*"))                      # resume cleared the debris


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
    output, _ = process.communicate(timeout=120)
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
    from checkpointing import StopSignals
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signals.received == signal.SIGTERM          # noted, not raised: the step finishes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
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
