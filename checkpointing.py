"""Atomic writes and run checkpoints: a crash never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -- run folders -------------------------------------------------------------------------------
class RunFolderError(FileExistsError):
    pass


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Read-only: a new run never lands on an old one unless asked (resume continues it,
    overwrite replaces it). Raises before anything is written."""
    run_dir = Path(run_dir)
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunFolderError(f"{run_dir}: --resume given but there is no checkpoint in {run_dir / 'checkpoints'}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunFolderError(f"{run_dir} already exists; pass --resume to continue it, --overwrite to replace "
                             "it, or --name to start another run")
    return run_dir


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Create (or, with overwrite, replace) the run folder; main process only."""
    run_dir = check_run_dir(run_dir, resume, overwrite)
    if resume:
        return run_dir
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    for sub in ("checkpoints", "samples", "tokens"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(Path(run_dir, "checkpoints").glob("step_*[0-9]"))
    found = [p for p in found if (p / "state.json").exists()]
    return found[-1] if found else None


def load_adapters(path: Path) -> dict | None:
    """The adapter deltas saved with a checkpoint (or a per-object artefact), if any."""
    file = Path(path) / "adapters.safetensors"
    return load_file(str(file)) if file.exists() else None


def load_checkpoint(path: Path) -> tuple[int, dict, dict, dict]:
    """-> (step, heads state, optimizer state, state.json)."""
    state = json.loads((Path(path) / "state.json").read_text())
    heads = load_file(str(Path(path) / "heads.safetensors"))
    # Our own file (optimizer, scaler and RNG states, incl. Python's random state tuples).
    optimizer = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=False)
    return state["step"], heads, optimizer, state


def truncate_metrics(path: Path, step: int):
    """On resume, drop lines logged after the restored checkpoint (they will be logged again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
