"""The run's data: scan and validate the object folders for the active words, measure what the
heads fit to the data set (camera bounds, keypoint count; kept in the run's data.json, not its
config), split off held-out objects, and check the batches can be built. Everything here runs
before the run folder is touched."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from guided_concepts.concepts import CONCEPTS
from guided_concepts.configs.schema import Config, ConfigError, load_config, mask_set_options
from guided_concepts.objectdata import DataError, ObjectViewsDataset, ensure_default_data, scan_objects
from guided_concepts.toyworld import world2_data
from guided_concepts.toyworld.world import ensure_toyworld_data

# Data sets `data.root` may name instead of a folder (generated on first use). The generic data
# package knows none of them.
NAMED_DATASETS = {"toyworld": ensure_toyworld_data,
                  **{name: (lambda level=level: world2_data.ensure_world2_data(level))
                     for name, level in world2_data.NAMED_SETS.items()}}


def resolve_data_root(root: str | None) -> Path:
    """data.root -> a folder: null = the bundled chairs, a NAMED_DATASETS name (a folder with that
    name: write ./toyworld), else the path itself."""
    if not root:
        return ensure_default_data()
    if root in NAMED_DATASETS:
        return NAMED_DATASETS[root]()
    return Path(root)


def build_data(cfg: Config, held_out: list[str] | None = None):
    """-> (train, validation) datasets; raises DataError naming the file at the first problem.
    held_out: these objects are held out (a resumed run's recorded split), not the last data.holdout."""
    needs = {k for n in cfg.tokens for k in CONCEPTS[n].concept.requirements(cfg.concepts[n]).data}
    try:                                 # before a named set is generated or anything scanned
        world2_data.check_rendered_settings(cfg.data.root, cfg.data.rendered_objects, cfg.data.decouple)
    except ValueError as error:
        raise DataError(str(error)) from None
    root = resolve_data_root(cfg.data.root)
    records = scan_objects(root, require_masks="mask" in needs, require_cameras="camera" in needs,
                           require_keypoints="keypoints" in needs, resolution=cfg.data.resolution)
    if held_out is None:
        train_records, val_records = split_holdout(records, cfg.data.holdout, root)
    else:
        train_records = [r for r in records if r.name not in held_out]
        val_records = [r for r in records if r.name in held_out]
    mask_set = mask_set_options(cfg)
    if cfg.data.rendered_objects:        # new objects every epoch; the folders' held-out objects evaluate
        try:
            train = world2_data.rendered_training_set(cfg.data.root, cfg.data.rendered_objects, cfg.data.decouple,
                                                      cfg.data.resolution, cfg.train.seed, flip_prob=cfg.data.flip_prob,
                                                      random_set_size=True, **mask_set)
        except ValueError as error:
            raise DataError(str(error)) from None
    else:
        train = ObjectViewsDataset(train_records, cfg.data.resolution, cfg.data.flip_prob, seed=cfg.train.seed,
                                   random_set_size=True, **mask_set)
    val = ObjectViewsDataset(val_records or train_records, cfg.data.resolution, flip_prob=0.0, **mask_set)
    check_data_fits(cfg, train)
    return train, val


DATA_RECORD = "data.json"


class DataRecordError(DataError):
    """A run's data.json that cannot be read."""


def read_data_record(run_dir) -> dict | None:
    """The data a run was split on (None for a run from before data.json, or no run)."""
    path = Path(run_dir) / DATA_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        held, objects = record.get("held_out"), record.get("objects")
        if not (isinstance(held, list) and all(isinstance(n, str) for n in held)
                and isinstance(objects, dict) and all(isinstance(v, dict) for v in objects.values())):
            raise ValueError("expected held_out: [names], objects: {name: {view: sizes}}")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise DataRecordError(f"{path}: damaged or unreadable ({err}); restore it, or delete it to split anew "
                              "by data.holdout") from err
    return record


def run_split(records: list, holdout: int, root, run_dir=None) -> tuple[list, list]:
    """A run's (training, held-out) records: as its data.json recorded them when it has one (so
    evaluation and tuning see the split training used, whatever was added since), else the last
    `holdout` objects."""
    recorded = read_data_record(run_dir) if run_dir is not None else None
    if recorded is None:
        return split_holdout(records, holdout, root)
    held = set(recorded["held_out"])
    return [r for r in records if r.name not in held], [r for r in records if r.name in held]


def split_holdout(records: list, holdout: int, root) -> tuple[list, list]:
    """-> (training, held-out) records: the last `holdout` objects are held out. Holding out every
    object is an error, not a silent holdout of 0 (validation would then show training objects)."""
    if holdout >= len(records) and holdout > 0:
        raise DataError(f"{root}: data.holdout={holdout} holds out all {len(records)} object(s), leaving none to "
                        "train on; add objects, or --set data.holdout=0 to train on all (validation then shows "
                        "training objects)")
    return records[:len(records) - holdout], records[len(records) - holdout:]


def data_record(train_set, val_set, root) -> dict:
    """What a run was split on (data.json): the root, each object's views, the held-out objects
    and a fingerprint of names, view ids and file sizes, so a resume can tell the data changed."""
    def views(record):
        return {v.view_id: [Path(p).stat().st_size if p and Path(p).exists() else None
                            for p in (v.image_path, v.mask_path)] for v in record.views}
    objects = {r.name: views(r) for r in train_set.records}
    held_out = [r.name for r in val_set.records if r.name not in objects]    # holdout 0: validation = training
    objects.update({r.name: views(r) for r in val_set.records})
    digest = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]
    return {"root": str(Path(root).resolve()), "fingerprint": digest, "held_out": held_out, "objects": objects}


def data_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between a run's data.json and the data now: one phrase per kind of change."""
    if recorded.get("fingerprint") == current["fingerprint"] and recorded.get("held_out") == current["held_out"]:
        return []
    old, new = recorded.get("objects", {}), current["objects"]
    changes = []
    for label, names in (("added", sorted(set(new) - set(old))), ("removed or renamed", sorted(set(old) - set(new))),
                         ("views changed", sorted(n for n in set(old) & set(new) if old[n] != new[n]))):
        if names:
            changes.append(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})")
    moved = [n for n in recorded.get("held_out", []) if n in new and n not in current["held_out"]]
    if moved:
        changes.append(f"held-out object(s) that would now train: {', '.join(moved[:5])}")
    return changes or [f"the held-out objects: {recorded.get('held_out')} -> {current['held_out']}"]


def filled_by_data(cfg: Config, info: dict) -> dict:
    """{word: {key: value}}: the active words' keys left null that `info` (dataset_info) fills."""
    derived = {}
    for n in cfg.tokens:
        given = cfg.concepts[n]
        fitted = CONCEPTS[n].concept.fit_to_data(copy.deepcopy(given), info)
        filled = {k: v for k, v in dataclasses.asdict(fitted).items() if getattr(given, k) is None and v is not None}
        if filled:
            derived[n] = filled
    return derived


def derived_settings(cfg: Config, train_set, val_set) -> dict:
    """What the data fills (camera bounds, keypoint count). A run records it in data.json; its
    config.yaml keeps what the user set."""
    return filled_by_data(cfg, dataset_info(list(train_set.records) + list(val_set.records)))


def with_derived(cfg: Config, derived: dict | None) -> Config:
    """A copy of `cfg` whose null word keys take the run's data-derived values (a key the user
    set keeps its value)."""
    cfg = copy.deepcopy(cfg)
    for n, values in (derived or {}).items():
        if n in cfg.concepts:
            given = cfg.concepts[n]
            cfg.concepts[n] = dataclasses.replace(given, **{k: v for k, v in values.items() if getattr(given, k, 0) is None})
    return cfg


def load_run_config(run_dir) -> Config:
    """A run's config as it trained: config.yaml with data.json's data-derived values filled in.
    A run whose words need such values and whose data.json lacks them is refused: the heads would
    load and silently read their inputs on the wrong scale."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    try:
        record, damage = read_data_record(run_dir), None
    except DataRecordError as error:
        record, damage = None, error
    if record is not None and "derived" in record:
        return with_derived(cfg, record["derived"])
    # dataset_info's bounds (a missing keypoint count fails loudly when a head is built, so it is left out)
    probe = {"elevation": (0.0, 1.0), "distance": (1.0, 2.0), "num_keypoints": 0}
    missing = [f"concepts.{n}.{k}" for n, keys in filled_by_data(cfg, probe).items() for k in keys]
    if missing:      # a run from before data.json kept them in config.yaml, so only a lost data.json lands here
        why = str(damage) if damage else f"{run_dir / DATA_RECORD} is missing or has no 'derived' record"
        raise ConfigError(f"{why}; it holds what the run's words took from the data ({', '.join(missing)}): "
                          f"restore it from the run's copy, or set those keys in {run_dir / 'config.yaml'}")
    return cfg


def samples_per_step(cfg: Config, train_set) -> int:
    """What train.batch_size becomes: whole triplets with data.triplets, at most the training views."""
    if cfg.data.triplets:
        return 3 * max(1, cfg.train.batch_size // 3)
    return min(cfg.train.batch_size, len(train_set))


def dataset_info(records) -> dict:
    """Dataset-wide bounds the heads rescale with."""
    views = [v for r in records for v in r.views]
    def bounds(key):
        values = [getattr(v, key) for v in views if getattr(v, key) is not None]
        return (min(values), max(values)) if values else None
    return {"elevation": bounds("elevation"), "distance": bounds("distance"),
            "num_keypoints": max((len(v.keypoints or []) for v in views), default=0)}


def check_data_fits(cfg: Config, train_set) -> None:
    """Triplet batches pair each view with another object at the same camera: 2 objects at least."""
    objects = len(train_set.records)
    if cfg.data.triplets and objects < 2:
        raise DataError(f"{cfg.data.root or 'bundled data'}: {objects} training object(s) after holding out "
                        f"{cfg.data.holdout}; data.triplets batches need at least 2 (a view of another object at the "
                        "same camera): add objects, lower data.holdout, or --set data.triplets=false")
