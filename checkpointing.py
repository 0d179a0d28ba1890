"""Run folders, atomic checkpoints, RNG states and stop signals: a crash, a Ctrl-C or a SIGKILL
mid-save never costs more than one checkpoint interval."""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _fsync(path: Path):
    """Flush a file (or a folder's entries) to disk, so a rename never lands before its data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:          # e.g. folders on Windows cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -- run folders -------------------------------------------------------------------------------
class RunFolderError(FileExistsError):
    pass


# What a run writes in its folder: --overwrite removes these and nothing else. A folder holding
# anything more (a user's photos, a data object, a checkout) is not a run and is never emptied.
RUN_ENTRIES = ("config.yaml", "environment.json", "environment.json.damaged", "metrics.jsonl", "data.json",
               "checkpoints", "samples", "tokens", "objects", "export", "wandb", "failure.json", "failure_rank*.json",
               "fit_targets.json", "word_directions.json", ".lock", ".*.tmp")
# What only this project writes (a folder with just config.yaml and checkpoints/ may be another tool's).
RUN_MARKERS = ("environment.json", "data.json")
LOCK_NAME = ".lock"


def check_run_name(name: str, key: str = "run.name") -> str:
    """A run name is one path segment: not empty, not . or .., no separator, within the
    filesystem's name limit. Raises RunFolderError before anything is touched."""
    if not isinstance(name, str) or not name.strip():
        raise RunFolderError(f"{key}: empty; give the run a name (--name NAME)")
    if name in (".", "..") or "/" in name or (os.sep != "/" and os.sep in name) or "\0" in name:
        raise RunFolderError(f"{key}: {name!r} is not a name but a path; a run name is one folder name "
                             "(move the runs with --set run.output_dir=DIR)")
    size = len(os.fsencode(name))
    if size > 255:                     # NAME_MAX on ext4, xfs, btrfs, APFS, NTFS
        raise RunFolderError(f"{key}: {size} bytes long; a folder name takes at most 255")
    return name


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protected_folders(data_root: str | Path | None = None) -> dict[str, Path]:
    """Folders a run folder may never be, nor contain: what --overwrite must not reach."""
    found = {"the current folder": Path.cwd(), "your home folder": Path.home(),
             "the guided-concepts checkout": Path(__file__).resolve().parent, "the filesystem root": Path("/")}
    if data_root:
        found["the data (data.root)"] = Path(data_root)
    return {what: Path(p).expanduser().resolve() for what, p in found.items()}


def run_entries(run_dir: Path, entries=RUN_ENTRIES) -> tuple[list[Path], list[Path]]:
    """-> (the run's own entries, anything else) in `run_dir`."""
    own, other = [], []
    for entry in sorted(Path(run_dir).iterdir()):
        (own if any(entry.match(pattern) for pattern in entries) else other).append(entry)
    return own, other


def clear_run_folder(run_dir: Path, data_root: str | Path | None = None, entries=RUN_ENTRIES,
                     markers=RUN_MARKERS) -> None:
    """--overwrite: after check_overwritable, remove the run's own entries one by one (never the
    folder itself, nor its lock, nor anything a run does not write)."""
    check_overwritable(run_dir, data_root, entries, markers)
    for entry in run_entries(run_dir, entries)[0]:
        if entry.name != LOCK_NAME or entry.is_symlink() or not entry.is_file():    # a real lock file stays
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def check_overwritable(run_dir: Path, data_root: str | Path | None = None, entries=RUN_ENTRIES,
                       markers=RUN_MARKERS) -> None:
    """--overwrite only empties a folder that holds a run and nothing of the user's, and never
    one that holds the data, the checkout, the current folder or home. Raises RunFolderError."""
    resolved = Path(run_dir).expanduser().resolve()
    for what, folder in protected_folders(data_root).items():
        if _is_within(folder, resolved):
            raise RunFolderError(f"{run_dir}: --overwrite refused: it {'is' if folder == resolved else 'holds'} "
                                 f"{what} ({folder}); choose another --name or run.output_dir")
    own, other = run_entries(run_dir, entries)
    # A run killed before its first checkpoint leaves empty folders (checkpoints/, samples/, tokens/)
    # and perhaps its config.
    started_only = any(e.name == "checkpoints" for e in own) and all(
        e.name in (LOCK_NAME, "config.yaml") or (e.is_dir() and not e.is_symlink() and not any(e.iterdir())) for e in own)
    if other or not (any(e.name in markers for e in own) or started_only):
        listed = ", ".join(e.name for e in other[:5]) + (", ..." if len(other) > 5 else "")
        raise RunFolderError(f"{run_dir}: --overwrite refused: not a run folder "
                             f"({'it holds ' + listed if other else 'none of ' + ', '.join(markers)}); "
                             "nothing was removed; choose another --name or run.output_dir")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, data_root: str | Path | None = None) -> Path:
    """Read-only: a new run never lands on an old one unless asked (resume continues it,
    overwrite replaces it), nor in a folder that holds the data or the checkout, nor while another
    process trains in it. Raises before anything is written."""
    run_dir = Path(run_dir)
    check_run_name(run_dir.name if run_dir.name else str(run_dir))
    resolved = run_dir.expanduser().resolve()
    for what, folder in protected_folders(data_root).items():
        inside_data = what.startswith("the data") and _is_within(resolved, folder)    # it would be scanned as data
        if not what.startswith("the data") and not overwrite:
            continue                     # only --overwrite removes anything (check_overwritable checks these)
        if _is_within(folder, resolved) or inside_data:
            relation = "be" if folder == resolved else "be inside" if inside_data else "hold"
            raise RunFolderError(f"{run_dir}: a run folder may not {relation} {what} ({folder}); "
                                 "choose another --name or run.output_dir")
    check_unlocked(run_dir)
    if resume:
        if latest_checkpoint(run_dir) is None:
            how = ("it was stopped before its first checkpoint; start it again with --overwrite"
                   if run_dir.is_dir() else "no such run")
            raise RunFolderError(f"{run_dir}: --resume given but there is no checkpoint in {run_dir / 'checkpoints'} "
                                 f"({how})")
    elif run_dir.exists() and any(e.name != ".lock" for e in run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(f"{run_dir} already exists; pass --resume to continue it, --overwrite to replace "
                                 "it, or --name to start another run")
        check_overwritable(run_dir, data_root)
    return run_dir


def check_writable(folder: Path) -> None:
    """`folder`, or the nearest existing folder it will be created in, takes files: checked by
    creating (and at once removing) a nameless temporary file, so nothing is left behind."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"run.output_dir: {existing} is a file, not a folder (needed for {folder})")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunFolderError(f"run.output_dir: cannot write in {existing} ({err.strerror or err}); "
                             "choose another --set run.output_dir") from err


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, data_root: str | Path | None = None) -> Path:
    """Create (or, with overwrite, empty) the run folder; main process only, holding its lock.
    Overwrite removes the run's own entries one by one, never the folder or anything else."""
    run_dir = Path(run_dir)
    if resume:               # checked by check_run_dir before the model loaded
        return run_dir
    if run_dir.exists() and overwrite and any(e.name != LOCK_NAME for e in run_dir.iterdir()):
        clear_run_folder(run_dir, data_root)
    elif run_dir.exists() and any(e.name != ".lock" for e in run_dir.iterdir()):
        raise RunFolderError(f"{run_dir} already exists (another run started on this name meanwhile); "
                             "pass --resume to continue it, or --name to start another run")
    for sub in ("checkpoints", "samples", "tokens"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


# -- one process per run folder ----------------------------------------------------------------


def _lock_holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
            if info else "another process")


LOCK_TRIES = 20
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the run's lock alive after its parent
    dies: it closes its copies (the parent's own stay open, so the parent keeps the lock)."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _open_lock(lock_file: Path, flags: int) -> int:
    """Open the lock file itself, never what a link there points to (it would be emptied)."""
    try:
        fd = os.open(lock_file, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if lock_file.is_symlink():
            raise RunFolderError(f"{lock_file}: is a link, not this project's lock file; remove it") from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{lock_file}: is not a regular file; remove it")
    return fd


def _try_flock(fd: int) -> bool:
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def check_unlocked(run_dir: Path) -> None:
    """Read-only: raise RunFolderError naming the holder if a live process trains in `run_dir`."""
    lock_file = Path(run_dir) / LOCK_NAME
    if os.name != "posix" or not lock_file.is_file():
        return
    try:
        fd = _open_lock(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if not _try_flock(fd):
            raise RunFolderError(f"{run_dir}: another process is training in this run folder "
                                 f"({_lock_holder(lock_file)}); wait for it, stop it, or choose another --name")
    finally:
        os.close(fd)       # closing drops our probe lock, if we got it


class RunLock:
    """An exclusive lock on a run folder for as long as a process trains in it: run_dir/.lock, held
    with flock (the kernel drops it when the process dies, however it dies) and holding the pid,
    host and start time, which a second process names. A lock file with a holder but no live
    lock was left by a killed process: it is stale, said, and taken over."""

    def __init__(self, run_dir: Path):
        self.file = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.stale: str | None = None

    def acquire(self) -> "RunLock":
        if os.name != "posix":           # no flock: no lock (said in docs/usage.md)
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(LOCK_TRIES):
            fd = _open_lock(self.file, os.O_RDWR | os.O_CREAT)
            if _try_flock(fd):
                try:                      # the file we locked must still be the one at the path
                    same = os.fstat(fd).st_ino == os.stat(self.file, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
            os.close(fd)
            time.sleep(0.1)               # another process's probe (check_unlocked) holds it for an instant
        else:
            raise RunFolderError(f"{self.file.parent}: another process is training in this run folder "
                                 f"({_lock_holder(self.file)}); wait for it, stop it, or choose another --name")
        try:
            if os.read(fd, 4096).strip():
                self.stale = _lock_holder(self.file)
            record = json.dumps({"pid": os.getpid(), "host": platform.node(),
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def release(self) -> None:
        """Empty the file (a clean end: nothing stale) and drop the lock."""
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            _HELD_LOCKS.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, heads: dict, optimizer_state: dict, extra: dict | None = None,
                    adapters: dict | None = None) -> Path:
    """checkpoints/step_XXXXXX/{heads.safetensors, optimizer.pt, state.json}, written to a temp
    folder and renamed into place, so a checkpoint is either whole or absent."""
    def write(tmp: Path):
        save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
        if adapters:
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    return atomic_folder(Path(run_dir) / "checkpoints" / f"step_{step:06d}", write)


def atomic_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary folder next to `final`, then rename it into place
    (replacing an older `final`): the folder is either whole or absent."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():   # a kill between the two renames below: put it back
        os.replace(old, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            _fsync(file)
        _fsync(tmp)
        if final.exists():           # keep the old copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Half-written `.name.*.tmp` folders/files a killed process left behind (never loaded)."""
    found = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all)."""
    complete = _complete_checkpoints(run_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    for path in doomed:       # renamed first, so a kill mid-delete never leaves half a checkpoint
        trash = path.with_name(f".{path.name}.deleting.tmp")
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in Path(run_dir, "checkpoints").glob("step_*[0-9]") if p.name[5:].isdigit()]
    return sorted((p for p in found if (p / "state.json").exists()), key=lambda p: int(p.name[5:]))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message starts with the file."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _complete_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """-> (the newest checkpoint whose every file loads, or None; the problems of newer ones)."""
    problems = []
    for path in reversed(_complete_checkpoints(run_dir)):
        try:
            load_checkpoint(path)
            return path, problems
        except CheckpointError as err:
            problems.append(str(err))
    return None, problems


def set_aside_newer(run_dir: Path, kept: Path) -> list[str]:
    """Rename the checkpoints newer than `kept` (damaged ones a resume skipped) to step_N.damaged:
    kept for inspection, never listed or loaded again. -> their new names."""
    names = []
    for path in _complete_checkpoints(run_dir):
        if int(path.name[5:]) > int(Path(kept).name[5:]):
            aside = path.with_name(f"{path.name}.damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            names.append(aside.name)
    return names


def _read(file: Path, read):
    try:
        return read(file)
    except Exception as err:        # truncated, zeroed, wrong format: each library raises its own
        raise CheckpointError(f"{file}: damaged or unreadable ({type(err).__name__}: {str(err)[:200]})") from err


def load_heads(path: Path) -> dict:
    """heads.safetensors of a checkpoint or per-object artefact folder (CheckpointError names it)."""
    return _read(Path(path) / "heads.safetensors", lambda f: load_file(str(f)))


def load_adapters(path: Path) -> dict | None:
    """The adapter deltas saved with a checkpoint (or a per-object artefact), if any."""
    file = Path(path) / "adapters.safetensors"
    return _read(file, lambda f: load_file(str(f))) if file.exists() else None


def load_state(path: Path) -> dict:
    def read(file):
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
        return state
    return _read(Path(path) / "state.json", read)


def load_checkpoint(path: Path) -> tuple[int, dict, dict, dict]:
    """-> (step, heads state, optimizer state, state.json); CheckpointError names a damaged file."""
    state = load_state(path)
    heads = load_heads(path)
    # Our own file (optimizer, scaler and RNG states, incl. Python's random state tuples).
    optimizer = _read(Path(path) / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False))
    load_adapters(path)
    return state["step"], heads, optimizer, state


def truncate_metrics(path: Path, step: int):
    """On resume, drop lines logged after the restored checkpoint (they will be logged again),
    and a torn last line a killed process may have left."""
    if Path(path).exists():
        kept = []
        for line in Path(path).read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def record_failure(run_dir: Path, step: int, terms: dict, loss, batch: dict, prompts: list[str],
                   process_index: int = 0) -> tuple[str, dict | None]:
    """A non-finite loss: which terms, which samples, which prompts -> failure.json (or
    failure_rank<i>.json), and the message to stop with. The record is None on a process whose
    own loss was finite (another process saw the problem)."""
    bad = {k: v.detach().float().tolist() for k, (_, v) in terms.items() if not torch.isfinite(v.detach()).all()}
    samples = [f"{o}/{v}" for o, v in zip(batch["object_name"], batch["view_id"])]
    record = {"step": step, "nonfinite": bad or {"loss": float(loss)}, "samples": samples, "prompts": prompts}
    path = Path(run_dir) / ("failure.json" if process_index == 0 else f"failure_rank{process_index}.json")
    local = bool(bad) or not torch.isfinite(loss.detach()).item()
    if local:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    message = (f"non-finite loss at step {step} ({', '.join(bad) or 'loss'}; samples {', '.join(samples)}); nothing "
               f"was saved from this step; last good checkpoint: {latest_checkpoint(run_dir) or 'none'}; details in {path}"
               if local else f"non-finite loss at step {step} on another process; nothing was saved from this step")
    return message, record if local else None


def heads_fingerprint(state: dict) -> torch.Tensor:
    """Sum and sum of squares of every saved tensor (float64): equal on every process under DDP."""
    return torch.stack([sum(v.double().sum() for v in state.values()), sum(v.double().pow(2).sum() for v in state.values())])


# -- RNG states --------------------------------------------------------------------------------
def global_rng_states() -> dict:
    """Python, NumPy and torch (CPU and every CUDA device) global generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_global_rng_states(states: dict) -> list[str]:
    """Inverse of global_rng_states; -> the names restored."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    restored = ["python", "numpy", "torch"]
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
        restored.append("cuda")
    return restored


# -- stop signals ------------------------------------------------------------------------------
class StopSignals:
    """SIGINT/SIGTERM set `received`; the loop finishes its step, checkpoints and exits. With
    `escalate`, a second signal interrupts at once (KeyboardInterrupt), for a user who means it.
    The handler only sets a flag (printing here could collide with tqdm's own writes)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, escalate: bool = True):
        self.received: int | None = None
        self.escalate = escalate
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and self.escalate:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # handlers only install there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def end_training_patiently(accelerator, patience_s: float = 120.0) -> None:
    """accelerator.end_training() (trackers, then the process group) for a run whose work is all
    written and whose ranks have met at a barrier. torch's process-group teardown can stall on
    rare occasions (pytorch/pytorch#75097; seen once here, gloo on CPU): after `patience_s` the
    process prints every thread's stack, says so, and exits 0 rather than hang forever."""
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return

    def stalled():
        print(f"warning: the process-group teardown stalled for {patience_s:.0f} s after the run finished "
              "(everything is written); exiting. Stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(0)

    import faulthandler
    watchdog = threading.Timer(patience_s, stalled)
    watchdog.daemon = True
    watchdog.start()
    # Backstop if the stuck call holds the GIL (the timer thread then never runs): faulthandler's
    # own thread prints the stacks and exits 1.
    faulthandler.dump_traceback_later(2 * patience_s, exit=True)
    try:
        accelerator.end_training()
    finally:
        faulthandler.cancel_dump_traceback_later()
        watchdog.cancel()


# -- what the run ran on -----------------------------------------------------------------------
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "kornia",
            "guided-concepts")


def environment_record(**extra) -> dict:
    """Package versions, Python, platform and time, plus the caller's facts (seed, device, ...)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "argv": sys.argv, **extra}


def append_environment(run_dir: Path, record: dict) -> Path:
    """environment.json holds one record per start or resume of the run."""
    path = Path(run_dir) / "environment.json"
    try:
        records = json.loads(path.read_text()) if path.exists() else []
        if not isinstance(records, list):
            raise ValueError("not a list of records")
    except (ValueError, UnicodeDecodeError) as err:      # torn by a kill or a full disk: keep it aside
        aside = path.with_name("environment.json.damaged")
        os.replace(path, aside)
        print(f"warning: {path} was damaged ({str(err)[:80]}); moved to {aside.name}, starting a new record",
              file=sys.stderr)
        records = []
    records.append(record)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records, indent=1, default=str)))
