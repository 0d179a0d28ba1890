"""Faults, round 3: bad run names and --overwrite never reach outside the run's own folder; one
process trains in a folder at a time; a resume keeps the split it was made on; a full disk, a
file gone mid-run, a run stopped before its first checkpoint and a damaged environment record
each end in one line that says how to go on; every entry point answers bad input with one line
and exit code 2, and a bug with a traceback and where to report it."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guided_concepts import train
from guided_concepts.checkpointing import latest_checkpoint
from guided_concepts.cli import entry_point
from tests.conftest import with_settings

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--set", "train.batch_size=6", "--set", "train.sample_every=0", "--set", "sample.steps=1",
         "--set", "data.holdout=1", "--set", "train.steps=2"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with a hash of its bytes (folders as entries too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def copy_chairs(chairs_dir: Path, root: Path, count: int = 4) -> Path:
    for folder in sorted(chairs_dir.iterdir())[:count]:
        shutil.copytree(folder, root / folder.name)
    return root


@pytest.fixture
def world(tmp_path, chairs_dir):
    """A user's disk: a runs folder with another run and a file of theirs, a photo folder, data."""
    data = copy_chairs(chairs_dir, tmp_path / "data")
    runs = tmp_path / "runs"
    (runs / "other" / "checkpoints").mkdir(parents=True)
    (runs / "other" / "config.yaml").write_text("tokens: [shape]\n")
    (runs / "notes.txt").write_text("my notes")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "IMG_0001.jpg").write_bytes(b"\xff\xd8 a photo")
    return tmp_path, data, runs


# name or output folder -> the message; each with --overwrite (the dangerous form) and without
BAD_PLACES = {
    "empty name": (["--name", ""], "run.name: empty"),
    "name .": (["--name", "."], r"run.name: '\.' is not a name but a path"),
    "name ..": (["--name", ".."], r"run.name: '\.\.' is not a name but a path"),
    "name ../x": (["--name", "../x"], r"run.name: '\.\./x' is not a name but a path"),
    "name a/b": (["--name", "a/b"], r"run.name: 'a/b' is not a name but a path"),
    "name over the filesystem's limit": (["--name", "n" * 300], "300 bytes long; a folder name takes at most 255"),
    "a photo folder": (["--set", "run.output_dir={tmp}", "--name", "photos"], r"photos: --overwrite refused: not a run "
                       r"folder \(it holds IMG_0001.jpg\)|photos already exists"),
    "the data object trained on": (["--set", "run.output_dir={data}", "--name", "chair_000"],
                                   r"a run folder may not be inside the data \(data.root\)"),
    "a folder holding the data": (["--set", "run.output_dir={tmp}", "--name", "data"],
                                  r"a run folder may not be the data \(data.root\)"),
    "the current folder's parent": (["--set", "run.output_dir={tmp}", "--name", "runs"],
                                    r"a run folder may not hold the current folder|runs already exists"),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("case", list(BAD_PLACES))
def test_a_bad_name_or_overwrite_touches_nothing(case, overwrite, world, monkeypatch):
    tmp, data, runs = world
    monkeypatch.chdir(runs / "other")
    extra, message = BAD_PLACES[case]
    extra = [e.replace("{tmp}", str(tmp)).replace("{data}", str(data)) for e in extra]
    before = snapshot(tmp)
    args = with_settings(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK], *extra)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + (["--overwrite"] if overwrite else []))
    import re
    assert str(stopped.value).startswith("error: ") and "\n" not in str(stopped.value)
    assert re.search(message, str(stopped.value)), str(stopped.value)
    assert snapshot(tmp) == before           # the other runs, the notes, the photos and the data


def test_overwrite_replaces_a_run_but_not_a_file_of_the_users_inside_it(world):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    (run / "my_figure.png").write_bytes(b"png")
    before = snapshot(tmp)
    with pytest.raises(SystemExit, match=r"--overwrite refused: not a run folder \(it holds my_figure.png\)"):
        train.main(with_settings(args, "--overwrite"))
    assert snapshot(tmp) == before
    (run / "my_figure.png").unlink()
    (run / "metrics.jsonl").write_text('{"step": 99}\n')             # an older run's line
    assert train.main(with_settings(args, "--overwrite")) == run
    assert all(json.loads(line)["step"] <= 2 for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (runs / "other" / "config.yaml").exists() and (runs / "notes.txt").exists()


# ----------------------------------------------------------------------------------------------
# One process per run folder
# ----------------------------------------------------------------------------------------------
HOLD = "import sys; from guided_concepts.checkpointing import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"


@pytest.mark.slow
def test_a_second_process_is_refused_by_name_and_a_stale_lock_is_taken_over(world, capsys):
    from guided_concepts.checkpointing import RunLock
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp)
        for extra in (["--overwrite"], ["--resume", "--set", "train.steps=4"]):
            with pytest.raises(SystemExit, match=rf"another process is training in this run folder \(pid {holder.pid} "
                                                 r"on host .*, started 20\d\d-"):
                train.main(with_settings(args, *extra))
        assert snapshot(tmp) == before
        # The second of two new runs on one name: the first holds the folder before writing.
        (tmp / "runs" / "new").mkdir()
        lock = RunLock(tmp / "runs" / "new").acquire()
        try:
            with pytest.raises(SystemExit, match=r"another process is training in this run folder"):
                train.main(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "new"])
        finally:
            lock.release()
    finally:
        holder.kill()                        # SIGKILL: no clean release, the lock file keeps its holder
        holder.wait(timeout=60)
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    capsys.readouterr()
    train.main(with_settings(args, "--resume", "--set", "train.steps=4"))
    assert f"was left by a process that is gone (pid {holder.pid}" in capsys.readouterr().out
    assert latest_checkpoint(run).name == "step_000004"
    assert (run / ".lock").read_text() == ""        # a clean end leaves no holder


# ----------------------------------------------------------------------------------------------
# Resume: the recorded split, the step, a run stopped early, damaged records
# ----------------------------------------------------------------------------------------------
def rewrite_uncompressed(path: Path):
    from PIL import Image
    Image.open(path).convert("RGB").save(path, compress_level=0)


def rename_object(data: Path):
    os.replace(data / "chair_001", data / "chair_001b")


DATA_EDITS = {
    "an object added": (lambda d, c: shutil.copytree(c / sorted(os.listdir(c))[5], d / "chair_new"), r"added: chair_new"),
    "an object removed": (lambda d, c: shutil.rmtree(d / "chair_000"), r"removed or renamed: chair_000"),
    "an object renamed": (lambda d, c: rename_object(d), r"added: chair_001b .*removed or renamed: chair_001"),
    "a view re-rendered": (lambda d, c: rewrite_uncompressed(d / "chair_002" / "views" / "005.png"),
                           r"views changed: chair_002"),
}


@pytest.mark.parametrize("case", list(DATA_EDITS))
@pytest.mark.slow
def test_resume_refuses_changed_data_and_force_keeps_the_recorded_split(case, world, chairs_dir, capsys):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    recorded = json.loads((run / "data.json").read_text())
    assert recorded["held_out"] == ["chair_003"] and len(recorded["objects"]) == 4
    edit, message = DATA_EDITS[case]
    edit(data, chairs_dir)
    before = snapshot(runs)
    resume = with_settings(args, "--resume", "--set", "train.steps=3")
    with pytest.raises(SystemExit, match=rf"data.json: the data changed since the run was split \({message}"):
        train.main(resume)
    assert snapshot(runs) == before
    capsys.readouterr()
    train.main(resume + ["--force"])
    said = capsys.readouterr().out
    assert "--force: resuming on changed data" in said and "held out as recorded: chair_003" in said
    now = json.loads((run / "data.json").read_text())
    assert now["held_out"] == ["chair_003"] and now["fingerprint"] != recorded["fingerprint"]


def test_an_added_object_never_moves_the_held_out_one_into_training(world, chairs_dir):
    """Without the record, a new last object would be held out and chair_003 would train."""
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    shutil.copytree(sorted(chairs_dir.iterdir())[5], data / "chair_zzz")
    train.main(with_settings(args, "--resume", "--set", "train.steps=3", "--force"))
    assert json.loads((run / "data.json").read_text())["held_out"] == ["chair_003"]


def test_resume_below_the_checkpoints_step_is_refused(world):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    train.main(args)
    with pytest.raises(SystemExit, match=r"train.steps=1 is below the step of .*step_000002 \(2\).*train.steps=N "
                                         r"with N >= 2"):
        train.main(with_settings(args, "--resume", "--set", "train.steps=1"))


@pytest.mark.parametrize("left", ["folders only", "config.yaml too"])
def test_a_run_stopped_before_its_first_checkpoint_says_overwrite_and_overwrite_works(left, world):
    tmp, data, runs = world
    run = runs / "early"
    for sub in ("checkpoints", "samples", "tokens"):
        (run / sub).mkdir(parents=True)
    if left == "config.yaml too":
        (run / "config.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "early"]
    with pytest.raises(SystemExit, match=r"early.*(stopped before|no such run|no checkpoint).*--overwrite"):
        train.main(with_settings(args, "--resume"))
    assert train.main(with_settings(args, "--overwrite")) == run
    assert latest_checkpoint(run).name == "step_000002"


def test_a_damaged_environment_record_is_set_aside_on_resume(world, capsys):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    text = (run / "environment.json").read_text()
    (run / "environment.json").write_text(text[: len(text) // 2])
    train.main(with_settings(args, "--resume", "--set", "train.steps=3"))
    assert "environment.json was damaged" in capsys.readouterr().err
    assert (run / "environment.json.damaged").read_text() == text[: len(text) // 2]
    assert len(json.loads((run / "environment.json").read_text())) == 1
    assert latest_checkpoint(run).name == "step_000003"


# ----------------------------------------------------------------------------------------------
# Faults while the run trains: a full disk, a file that vanishes
# ----------------------------------------------------------------------------------------------
def test_a_full_disk_names_the_last_intact_checkpoint_and_resume_continues(world, monkeypatch):
    tmp, data, runs = world
    args = with_settings(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"],
                         "--set", "train.steps=3", "--set", "train.checkpoint_every=1")
    real = train.save_checkpoint

    def save(run_dir, step, *rest, **kw):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(run_dir) / "checkpoints" / ".step_000002.tmp"))
        return real(run_dir, step, *rest, **kw)
    monkeypatch.setattr(train, "save_checkpoint", save)
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    message = str(stopped.value)
    assert "no space left on the device" in message and message.endswith("step_000001; continue with --resume")
    monkeypatch.setattr(train, "save_checkpoint", real)
    run = train.main(with_settings(args, "--resume"))
    assert latest_checkpoint(run).name == "step_000003"


def test_a_view_deleted_while_the_run_trains_is_named(world, monkeypatch):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    real = train.make_loader

    def make_loader(cfg, train_set, accelerator):
        for view in (data / "chair_000" / "views").iterdir():    # gone once the run has started
            view.unlink()
        return real(cfg, train_set, accelerator)
    monkeypatch.setattr(train, "make_loader", make_loader)
    monkeypatch.setattr(train, "build_data", lambda cfg, held_out=None: train_build_data_uncached(cfg, held_out))
    with pytest.raises(SystemExit) as stopped:
        train.main(with_settings(args, "--set", "train.steps=20"))
    message = str(stopped.value)
    assert message.startswith("error: ") and "chair_000/views/" in message, message
    assert "the last intact checkpoint is none yet" in message


def train_build_data_uncached(cfg, held_out):
    """build_data with every view read from disk (no decoded copies kept), as on real data."""
    from guided_concepts.rundata import build_data
    train_set, val_set = build_data(cfg, held_out)
    for dataset in (train_set, val_set):
        dataset.cache.clear()
        dataset.cache_bytes = 0
    return train_set, val_set


# ----------------------------------------------------------------------------------------------
# Folders that cannot be read or written
# ----------------------------------------------------------------------------------------------
def test_a_data_root_without_search_permission_is_named(world, monkeypatch):
    tmp, data, runs = world
    real = Path.stat

    def stat(self, *a, **kw):   # root ignores permissions: what a folder without search (x) permission does
        if self.parent == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **kw)
    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(SystemExit) as stopped:
        train.main(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "u"])
    assert str(stopped.value) == f"error: {data}: cannot read the folder (Permission denied); check its permissions"


def test_a_read_only_cache_names_the_folder_and_the_setting(tmp_path, monkeypatch):
    cache = tmp_path / "readonly_home" / ".cache"
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(cache)):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **kw)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setenv("GUIDED_CONCEPTS_DATA", str(cache / "chairs"))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--set", f"run.output_dir={tmp_path / 'runs'}", *QUICK, "--name", "c"])
    message = str(stopped.value)
    assert message.startswith(f"error: {cache}") and "GUIDED_CONCEPTS_DATA" in message, message


# ----------------------------------------------------------------------------------------------
# Entry points: one line and exit code 2 for bad input, a traceback and where to report for a bug
# ----------------------------------------------------------------------------------------------
def run_entry(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        entry_point(main)
    return stopped.value.code, capsys.readouterr().err


def test_entry_point_codes(capsys, monkeypatch):
    def bad_input():
        train.main(["--set", "train.steps=many"])
    code, err = run_entry(bad_input, capsys)
    assert code == 2 and err.strip().startswith("error: train.steps: expected int") and "Traceback" not in err

    def ctrl_c():
        raise KeyboardInterrupt
    code, err = run_entry(ctrl_c, capsys)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1

    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")
    code, err = run_entry(disk_full, capsys)
    assert code == 2 and err.strip() == "error: /runs/x/metrics.jsonl: no space left on the device; free space and run again"

    def bug():
        return {}["missing"]
    code, err = run_entry(bug, capsys)
    assert code == 1 and "Traceback" in err and "KeyError" in err and "This is a bug in guided-concepts" in err


def test_ctrl_c_during_the_data_scan_is_one_line(capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_data", interrupted)
    code, err = run_entry(lambda: train.main(["--set", "train.steps=1"]), capsys)
    assert code == 130 and "Traceback" not in err


ENTRY_POINTS = {     # command -> bad input; each must answer with one line and exit code 2
    "train": ([str(REPO / "train.py"), "--set", "train.stepz=3"], "unknown key train.stepz"),
    "train, a name too long": ([str(REPO / "train.py"), "--name", "n" * 300], "a folder name takes at most 255"),
    "generate": ([str(REPO / "generate.py"), "--run", "{tmp}/nope", "--prompt", "a chair"], "not a run folder"),
    "export": ([str(REPO / "export.py"), "--run", "{tmp}/nope"], "not a run folder"),
    "tune": ([str(REPO / "tune.py"), "--run", "{tmp}/nope", "--object", "{tmp}"], "not a run folder"),
    "sweep": ([str(REPO / "sweep.py"), "--sweep", "train.stepz=1,2"], "unknown key train.stepz"),
    "evaluation": (["-m", "guided_concepts.evaluation", "{tmp}/nope"], "not a run folder"),
    "toyworld": (["-m", "guided_concepts.toyworld", "pretrain", "--out", "{tmp}/t", "--set", "nope=1"], "nope"),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.slow
def test_every_entry_point_answers_bad_input_with_one_line_and_code_2(name, tmp_path):
    argv, message = ENTRY_POINTS[name]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and message in lines[-1], done.stderr
    assert lines[-1].startswith("error: ") or "error:" in lines[-1]


# ----------------------------------------------------------------------------------------------
# Names at the filesystem's edge, --overwrite in ToyWorld's pretraining, an unwritable output
# ----------------------------------------------------------------------------------------------
def test_a_run_with_the_longest_name_exports_words_whose_files_fit(world):
    from guided_concepts import export
    tmp, data, runs = world
    run = train.main(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "n" * 255])
    manifest = export.main(["--run", str(run), "--shape-from", str(data / "chair_000"), "--pt"])
    files = [p for p in Path(manifest).parent.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".safetensors" for p in files)
    assert max(len(p.name.encode()) for p in files) <= 200


def test_toyworld_pretrain_overwrite_refuses_a_folder_that_is_not_a_pretraining_run(world, capsys):
    from guided_concepts.toyworld.__main__ import main as toyworld_main
    tmp, data, runs = world
    before = snapshot(tmp)
    for out in (tmp / "photos", data, runs / "other"):
        with pytest.raises(SystemExit) as stopped:
            toyworld_main(["pretrain", "--out", str(out), "--overwrite"])
        assert stopped.value.code == 2 and "--overwrite refused" in capsys.readouterr().err
    assert snapshot(tmp) == before


def test_generate_into_a_folder_that_takes_no_files_names_it_and_out(tmp_path, monkeypatch):
    from PIL import Image

    from guided_concepts import generate
    blocked = tmp_path / "readonly_checkout" / "runs"

    def refuse(image, fp, *a, **kw):           # what a read-only mount answers (root ignores chmod)
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(fp))
    monkeypatch.setattr(Image.Image, "save", refuse)
    with pytest.raises(SystemExit) as stopped:
        generate.main(["--prompt", "a chair", "--model", "tiny", "--num", "1", "--steps", "1",
                       "--out", str(blocked / "generated.png")])
    assert str(stopped.value).startswith(f"error: {blocked / 'generated.png'}: cannot write the samples")
    assert "pass --out FILE" in str(stopped.value)


def test_tune_out_never_replaces_a_folder_that_is_not_an_artefact(world, capsys):
    from guided_concepts import tune
    tmp, data, runs = world
    run = train.main(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"])
    obj = data / "chair_000"
    before = snapshot(tmp)
    for out, message in ((tmp / "photos", r"refused: not a tune.py artefact \(it holds IMG_0001.jpg\)"),
                         (obj / "tuned", "inside the object's data folder"),
                         (data / "new_object", "inside the object's data folder"), (data, "inside the object's data")):
        with pytest.raises(SystemExit, match=message):
            tune.main(["--run", str(run), "--object", str(obj), "--steps", "1", "--out", str(out)])
    assert snapshot(tmp) == before
    first = tune.main(["--run", str(run), "--object", str(obj), "--steps", "1", "--out", str(tmp / "art")])
    again = tune.main(["--run", str(run), "--object", str(obj), "--steps", "1", "--out", str(tmp / "art")])
    assert (tmp / "art" / "artefact.json").exists() and Path(again["path"]) == Path(first["path"])


def test_a_key_given_twice_on_the_command_line_is_refused(world):
    tmp, data, runs = world
    with pytest.raises(SystemExit, match=r"--set train.steps given twice \(train.steps=2, train.steps=5\); give it once"):
        train.main(["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--set", "train.steps=5"])
    with pytest.raises(SystemExit, match=r"--set run.name given twice .*\(--name sets run.name\)"):
        train.main(["--set", f"run.output_dir={runs}", *QUICK, "--set", "run.name=a", "--name", "b"])
    assert not runs.joinpath("a").exists() and not runs.joinpath("b").exists()


# ----------------------------------------------------------------------------------------------
# A second look (review): links, the split everywhere, forks, edges
# ----------------------------------------------------------------------------------------------
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(world):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(runs / "notes.txt")
    with pytest.raises(SystemExit, match=r"\.lock: is a link, not this project's lock file; remove it"):
        train.main(with_settings(args, "--resume", "--set", "train.steps=3"))
    assert (runs / "notes.txt").read_text() == "my notes"


def test_forked_workers_do_not_hold_the_lock(tmp_path):
    from guided_concepts.checkpointing import RunLock
    lock = RunLock(tmp_path).acquire()
    try:
        pid = os.fork()
        if pid == 0:                              # the child: its copy of the lock fd is closed
            try:
                os.fstat(lock.fd)
                os._exit(1)
            except OSError:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        os.fstat(lock.fd)                         # the parent's stays open
    finally:
        lock.release()


def test_resume_keeps_data_holdout_and_evaluation_sees_the_recorded_split(world, chairs_dir):
    from guided_concepts.configs.schema import load_config
    from guided_concepts.evaluation.runner import held_out_objects
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    with pytest.raises(SystemExit, match=r"data.holdout=2: the run holds out 1 recorded object\(s\)"):
        train.main(with_settings(args, "--resume", "--set", "data.holdout=2", "--force"))
    shutil.copytree(sorted(chairs_dir.iterdir())[5], data / "chair_zzz")      # now last, but it was never held out
    cfg = load_config(run / "config.yaml")
    assert [p.name for p in held_out_objects(cfg, run)] == ["chair_003"]
    assert [p.name for p in held_out_objects(cfg)] == ["chair_zzz"]           # without the run: by data.holdout


def test_resume_from_inside_the_run_folder_still_works(world, monkeypatch):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    monkeypatch.chdir(run / "samples")
    assert latest_checkpoint(train.main(with_settings(args, "--resume", "--set", "train.steps=3"))).name == "step_000003"


def test_a_damaged_data_record_is_named(world):
    tmp, data, runs = world
    args = ["--set", f"run.output_dir={runs}", "--set", f"data.root={data}", *QUICK, "--name", "r"]
    run = train.main(args)
    (run / "data.json").write_text('{"held_out": ["chair_003"], "objects": 5}')
    with pytest.raises(SystemExit, match=r"data.json: damaged or unreadable"):
        train.main(with_settings(args, "--resume", "--set", "train.steps=3"))


EDGE_FLAGS = {   # entry point, arguments -> the message (argparse or one line; never a traceback)
    "a name that is not UTF-8": (lambda t: train.main(["--name", "\udcff" * 300, "--set", f"run.output_dir={t}"]),
                                 "300 bytes long"),
    "generate --out without an image suffix": (lambda t: __import__("guided_concepts.generate").generate.main(
        ["--prompt", "a chair", "--model", "tiny", "--out", str(t / "x.unknownext")]), "expected an image file name"),
    "generate --device bogus": (lambda t: __import__("guided_concepts.generate").generate.main(
        ["--prompt", "a chair", "--model", "tiny", "--device", "bogus"]), "is not a device"),
    "toyworld evaluate --seeds 0": (lambda t: __import__("guided_concepts.toyworld.__main__").toyworld.__main__.main(
        ["evaluate", "--seeds", "0"]), "must be a whole number >= 1"),
    "toyworld evaluate --guidance-scale -1": (lambda t: __import__("guided_concepts.toyworld.__main__").toyworld.__main__.main(
        ["evaluate", "--guidance-scale", "-1"]), "must be a finite number >= 0"),
    "toyworld evaluate --model missing": (lambda t: __import__("guided_concepts.toyworld.__main__").toyworld.__main__
                                          .main(["evaluate", "--model", str(t / "nope")]), "--model"),
}


@pytest.mark.parametrize("case", list(EDGE_FLAGS))
def test_edge_flags_are_one_line(case, tmp_path, capsys):
    call, message = EDGE_FLAGS[case]
    with pytest.raises(SystemExit) as stopped:
        call(tmp_path)
    said = str(stopped.value) + capsys.readouterr().err
    assert stopped.value.code != 0 and message in said and "Traceback" not in said


def test_load_callable_names_a_plugin_that_does_not_load():
    from guided_concepts.evaluation.image_metrics import load_callable
    with pytest.raises(ValueError, match=r"'nonexist:fn': cannot load it \(ModuleNotFoundError"):
        load_callable("nonexist:fn", None)
    with pytest.raises(ValueError, match=r"'json:nothing': cannot load it \(AttributeError"):
        load_callable("json:nothing", None)
