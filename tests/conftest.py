"""Shared fixtures: one tiny model folder and one small synthetic data set per test session.

Nothing is downloaded: the model is built from config and saved/loaded with the real
save_pretrained/from_pretrained path; the data is generated procedurally.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before any project import: keep caches and wandb inside a throwaway folder, offline.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="guided-concepts-tests-"))
os.environ.setdefault("GUIDED_CONCEPTS_CACHE", str(_SESSION_TMP / "cache"))
os.environ.setdefault("GUIDED_CONCEPTS_DATA", str(_SESSION_TMP / "cache" / "synthetic_chairs"))
# The random tiny model for speed; configs/base.yaml (ToyWorld) has tests of its own.
os.environ.setdefault("GUIDED_CONCEPTS_CONFIG", str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"))
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from guided_concepts.backbone import ensure_tiny_model
    return ensure_tiny_model()          # the default `tiny` folder, inside the session cache


@pytest.fixture(scope="session")
def chairs_dir() -> Path:
    from guided_concepts.objectdata import ensure_default_data
    return ensure_default_data()        # the bundled default set (12 chairs x 6 views)


@pytest.fixture
def fresh_backbone(tiny_model_dir):
    """A freshly loaded tiny backbone (placeholders mutate the tokenizer, so never share it)."""
    from guided_concepts.backbone import load_backbone
    return load_backbone(str(tiny_model_dir))


def make_system(backbone, tokens=("shape",), concepts=None, losses=None, resolutions=None):
    from guided_concepts.concepts import CONCEPTS
    from guided_concepts.configs.schema import DEFAULTS_BEFORE_RECIPE
    from guided_concepts.system import GuidedConcepts
    concepts = concepts or {}
    losses = losses or {}
    # The unit tests' systems were written against the words' settings from before the ToyWorld
    # recipe became the dataclass defaults (configs/tiny.yaml keeps them too).
    before = DEFAULTS_BEFORE_RECIPE
    cc = {n: CONCEPTS[n].config(**{**before["concepts"].get(n, {}), **concepts.get(n, {})}) for n in CONCEPTS}
    lc = {n: CONCEPTS[n].loss_config(**{**before["losses"].get(n, {}), **losses.get(n, {})}) for n in CONCEPTS}
    return GuidedConcepts(backbone, cc, lc, list(tokens), resolutions)


@pytest.fixture
def chair_batch(chairs_dir):
    from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
    records = scan_objects(chairs_dir)
    dataset = ObjectViewsDataset(records[:4], resolution=64, flip_prob=0.0, mask_set_size=8)
    chosen, cameras = [], set()
    for o in range(4):        # 4 chairs, each seen from a camera the others are not
        index = next(i for i in dataset.views_of(o) if tuple(dataset[i]["camera"].tolist()) not in cameras)
        cameras.add(tuple(dataset[index]["camera"].tolist()))
        chosen.append(dataset[index])
    return collate(chosen)


def with_settings(base: list[str], *extra: str) -> list[str]:
    """`base` arguments then `extra`, dropping each `--set KEY=...` of base whose KEY extra sets
    again (train.py refuses a key given twice)."""
    given = {extra[i + 1].split("=", 1)[0] for i in range(len(extra) - 1) if extra[i] == "--set"}
    kept, i = [], 0
    while i < len(base):
        if base[i] == "--set" and i + 1 < len(base) and base[i + 1].split("=", 1)[0] in given:
            i += 2
            continue
        kept.append(base[i])
        i += 1
    return kept + list(extra)


def die_after_unet_checkpoint(monkeypatch):
    """Make pretraining raise KeyboardInterrupt right after its first UNet checkpoint (as a kill
    would); returns the original save_training, to put back before resuming."""
    from guided_concepts.toyworld import pretrain as module
    original = module.Pretraining.save_training

    def save_then_die(self, stage, step, *args, **kwargs):
        original(self, stage, step, *args, **kwargs)
        if stage == "unet":
            raise KeyboardInterrupt(f"killed after the unet checkpoint at step {step}")
    monkeypatch.setattr(module.Pretraining, "save_training", save_then_die)
    return lambda: monkeypatch.setattr(module.Pretraining, "save_training", original)
