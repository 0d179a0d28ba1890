"""Run configuration: YAML files -> dataclasses, with `--set section.key=value` overrides.

An unknown key is an error that lists the valid ones; a value of the wrong type names its key.
"""
from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
import warnings
from typing import Literal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from guided_concepts.choices import check_choices, choices_of
from guided_concepts.backbone.adapters import AdapterConfig
from guided_concepts.checkpointing import atomic_write, latest_intact_checkpoint, load_state
from guided_concepts.concepts import CONCEPTS, check_requirements


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = field(default="toyworld", metadata={"help": "'toyworld' (shipped, the default), 'tiny', 'tiny-sd15', 'tiny-sdxl' (built from config), a diffusers SD 1.x/2.x/SDXL folder, or a hub id (SDXL is recognised from the folder)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})
    image_encoder: str | None = field(default=None, metadata={"help": "CLIP vision model for heads that read pixels (default: the model's own image_encoder/)"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={"help": "no | fp16 | bf16 (frozen modules run in it, heads stay fp32); null = accelerate's own setting (accelerate launch --mixed_precision)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing: recompute activations in backward (captured maps are recorded once)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet (GPU; the first steps are slow while it compiles)"})

    def __post_init__(self):
        check_choices(self)


@dataclass
class DataConfig:
    root: str | None = field(default="toyworld", metadata={"help": "object folders; 'toyworld' (the default) = ToyWorld chairs with ground truth (48 objects x 8 views, generated on first use); null = the bundled synthetic chairs; 'toyworld2', 'toyworld2-floor', 'toyworld2-clutter' = ToyWorld 2's four categories at a background level"})
    resolution: int = field(default=32, metadata={"help": "training image size (ToyWorld 32, ToyWorld 2 48, SD 1.5 512)"})
    flip_prob: float = field(default=0.5, metadata={"help": "horizontal flip probability (image and mask together)"})
    holdout: int = field(default=8, metadata={"help": "objects held out for validation samples and metrics"})
    triplets: bool = field(default=True, metadata={"help": "batches of (view, same object other view, other object same camera) for the consistency losses"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers (started each epoch; pinned memory on CUDA)"})
    cache_latents: bool = field(default=False, metadata={"help": "encode each (view, flip) with the VAE once and keep its latent mean/std; the same samples are drawn as without the cache"})
    rendered_objects: int = field(default=0, metadata={"help": "ToyWorld 2 roots only: train on this many objects drawn afresh each epoch and rendered on demand (0 = data.root's folders); the root's held-out objects stay the evaluation set"})
    decouple: list[str] = field(default_factory=list, metadata={"help": "with rendered_objects: what the shape word's mask set differs in from the target view (the same shape): category (another category's masks), camera (other cameras)"})

    def __post_init__(self):
        if self.root is not None and not self.root.strip():     # "" would silently mean the bundled chairs
            raise ValueError("data.root: empty; give a folder, or 'toyworld', or null for the bundled chairs")
        if self.resolution < 8:
            raise ValueError(f"data.resolution: must be at least 8 pixels, got {self.resolution}")
        if self.holdout < 0:
            raise ValueError(f"data.holdout: must be >= 0, got {self.holdout}")
        if self.rendered_objects < 0:
            raise ValueError(f"data.rendered_objects: must be >= 0, got {self.rendered_objects}")
        if self.decouple and not self.rendered_objects:
            raise ValueError("data.decouple: only with data.rendered_objects > 0 (pairs are rendered on demand)")
        if self.rendered_objects and self.cache_latents:
            raise ValueError("data.cache_latents: rendered objects change every epoch; set one of "
                             "data.cache_latents=false or data.rendered_objects=0")


@dataclass
class PromptConfig:
    templates: list[str] = field(default_factory=lambda: ["a {category} {phrases}", "a photo of a {category} {phrases}"],
                                 metadata={"help": "{category} from meta.json; {shape}, {pose}, … a concept's clause (empty when inactive); {phrases} the other active clauses"})
    by_category: dict = field(default_factory=dict, metadata={"help": "category -> templates, overriding `templates` for that category"})


@dataclass
class AttentionConfig:
    resolutions: list[int] | None = field(default=None, metadata={"help": "cross-attention map sizes to capture; null = nearest to max(16, latent/4)"})


@dataclass
class TrainConfig:
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=9, metadata={"help": "samples per device batch (with data.triplets: batch_size // 3 anchors)"})
    union_sampling: bool = field(default=True, metadata={"help": "each prompt uses a random non-empty subset of the words (Break-A-Scene)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed for data order, noise and timesteps"})
    log_every: int = field(default=10, metadata={"help": "steps between metric lines"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (and at the end)"})
    sample_every: int = field(default=150, metadata={"help": "steps between validation grids (and at the end); 0 = end only; -1 = never (benchmarks, sweeps evaluated afterwards)"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={"help": "constant | linear | cosine decay of every group's lr after warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear lr warmup"})
    keep_last: int = field(default=5, metadata={"help": "checkpoints kept (older ones deleted after each save); 0 = keep all"})
    word_targets: str = field(default="", metadata={"help": "safetensors of per-object target words (keys <concept>/<object>; written by tune.py --targets) that losses.<concept>.target_weight pulls the words toward"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic torch algorithms (slower on GPU; CPU runs resume bit for bit either way)"})

    def __post_init__(self):
        check_choices(self)
        for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be at least 1, got {getattr(self, key)}")
        if min(self.warmup_steps, self.keep_last, self.sample_every + 1) < 0:
            raise ValueError("train.warmup_steps and keep_last must be >= 0, sample_every >= -1")

    def lr_factor(self, step: int) -> float:
        """Multiplier of every group's lr at `step` (0-based): linear warmup, then constant/linear/cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[self.lr_schedule]


@dataclass
class SampleConfig:
    num_objects: int = field(default=2, metadata={"help": "held-out objects shown in each validation grid"})
    steps: int = field(default=20, metadata={"help": "denoising steps"})
    guidance_scale: float = field(default=4.0, metadata={"help": "classifier-free guidance"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


@dataclass
class RunConfig:
    name: str = field(default="default", metadata={"help": "run folder name under output_dir"})
    output_dir: str = field(default="runs", metadata={"help": "where run folders go"})
    report_to: str = field(default="none", metadata={"help": "none | wandb"})


@dataclass
class TuneConfig:
    steps: int = field(default=15, metadata={"help": "per-object tuning steps (tune.py)"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the heads while tuning"})
    adapter_lr: float = field(default=1e-4, metadata={"help": "learning rate of the adapters while tuning"})
    train_adapters: bool = field(default=True, metadata={"help": "tune the adapters too (when the run has them)"})
    batch_size: int = field(default=4, metadata={"help": "views per tuning batch"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation while tuning"})
    hue_jitter: float = field(default=0.0, metadata={"help": "turn each tuning view's hue by a random angle up to this share of the colour circle (0: off; 0.5: any hue), so a word tuned on one object does not take up its colour"})
    losses: dict = field(default_factory=lambda: {"shape": {"mask_weight": 0.0}},
                         metadata={"help": "loss overrides while tuning, e.g. {shape: {mask_weight: 0}} (the seeds: mask loss in pre-training only)"})

    def __post_init__(self):
        if not 0.0 <= self.hue_jitter <= 0.5:
            raise ValueError(f"tune.hue_jitter: {self.hue_jitter!r} is not in [0, 0.5] (a share of the colour circle)")


@dataclass
class Config:
    tokens: list[str] = field(default_factory=lambda: ["shape", "pose"], metadata={"help": "active concepts"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    concepts: dict = field(default_factory=dict, metadata={"help": "per-concept token/head settings"})
    losses: dict = field(default_factory=dict, metadata={"help": "per-concept loss weights"})


class RawValue(str):
    """Text of a --set override: parsed as YAML, except where the field is a string (so that
    --name 001 or data.root=/data/a: b stay text)."""


def _check_value(key: str, value, hint):
    """Coerce obvious cases (int for float, list for tuple) and reject the rest, naming the key."""
    if isinstance(value, RawValue):
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = typing.get_args(hint) if union else (hint,)
        choices = [c for a in allowed for c in choices_of(a)]
        if (str in allowed or choices) and value.strip() not in ("null", "~", "None"):
            value = str(value)
            return _check_value(key, value, hint) if choices else value
        value = yaml.safe_load(value) if value.strip() else None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _check_value(key, value, hint)
    if origin is Literal:                  # a choice: the loader checks it and names the choices
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):      # PyYAML reads "1e-2" as text (YAML 1.1)
        try:
            value = float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        if hint is float and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return value
    if typing.get_origin(hint) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(hint)[0]
        items = [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if typing.get_origin(hint) is tuple else items
    return value


def build_dataclass(cls, data: dict | None, prefix: str):
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
                          f"{', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, RawValue):
                value = yaml.safe_load(value)
            kwargs[name] = build_dataclass(hint, value, f"{prefix}.{name}".lstrip("."))
        else:
            key = f"{prefix}.{name}".lstrip(".")
            kwargs[name] = _check_value(key, value, hint)
            if (name == "lr" or name.endswith("_lr")) and isinstance(kwargs[name], float) and kwargs[name] <= 0:
                raise ConfigError(f"{key}: a learning rate must be positive, got {kwargs[name]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err) if prefix in str(err) else f"{prefix}: {err}") from err


def build_config(raw: dict) -> Config:
    raw = dict(raw or {})
    tokens = raw.get("tokens", Config().tokens)
    if isinstance(tokens, RawValue):
        tokens = yaml.safe_load(tokens)
    if isinstance(tokens, str):
        tokens = [t.strip() for t in tokens.split(",") if t.strip()]
    unknown = [t for t in tokens if t not in CONCEPTS]
    if unknown or not tokens:
        raise ConfigError(f"tokens: unknown concept {unknown[0] if unknown else '(empty)'!r}; "
                          f"valid: {', '.join(CONCEPTS)}")
    raw["tokens"] = tokens
    sections = {}
    for key in ("concepts", "losses"):
        given = raw.pop(key, None) or {}
        bad = [k for k in given if k not in CONCEPTS]
        if bad:
            raise ConfigError(f"unknown key {key}.{bad[0]}; valid keys of {key}: {', '.join(CONCEPTS)}")
        part = "config" if key == "concepts" else "loss_config"
        # Every registered concept gets its config, active or not, so a sweep over an
        # inactive concept's key is caught as valid and the saved config is complete.
        sections[key] = {n: build_dataclass(getattr(entry, part), given.get(n), f"{key}.{n}")
                         for n, entry in CONCEPTS.items()}
    config = build_dataclass(Config, raw, "")
    config.concepts, config.losses = sections["concepts"], sections["losses"]
    check_templates(config)
    try:
        check_requirements(tokens, config.concepts, config.losses)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config


def check_templates(config: "Config") -> None:
    """Every template must give every active word a place ({phrases} or its own {slot}): a word
    that never appears in a prompt would silently never train (cf. diffusers #7294)."""
    named = [("prompt.templates", config.prompt.templates)]
    if not isinstance(config.prompt.by_category, dict):
        raise ConfigError(f"prompt.by_category: expected a mapping category -> templates, got {config.prompt.by_category!r}")
    named += [(f"prompt.by_category.{c}", t) for c, t in config.prompt.by_category.items()]
    slots = {"category", "phrases", *CONCEPTS}
    for key, templates in named:
        if isinstance(templates, str) or not templates:
            raise ConfigError(f"{key}: expected a non-empty list of templates, got {templates!r}")
        for i, template in enumerate(templates):
            try:
                used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
            except ValueError as err:
                raise ConfigError(f"{key}[{i}] {template!r}: {err}") from err
            if used - slots:
                raise ConfigError(f"{key}[{i}] {template!r}: unknown slot {{{sorted(used - slots)[0]}}}; "
                                  f"slots are {{category}}, {{phrases}}, " + ", ".join("{" + n + "}" for n in CONCEPTS))
            missing = [n for n in config.tokens if "phrases" not in used and n not in used]
            if missing:
                raise ConfigError(f"{key}[{i}] {template!r} has no slot for the {missing[0]} token; add {{phrases}} "
                                  f"(all active words) or {{{missing[0]}}}, or the word would never be trained")


def mask_set_options(config: "Config") -> dict:
    """ObjectViewsDataset's mask-set arguments for the active heads: how many views (0: none),
    at what size, with the views' shading or not."""
    needs = [CONCEPTS[n].concept.requirements(config.concepts[n]) for n in config.tokens]
    readers = [r for r in needs if "mask_set" in r.data]
    return {"mask_set_size": max((r.mask_set[0] for r in readers), default=0),
            "mask_set_resolution": max((r.mask_set[1] for r in readers), default=64),
            "set_shading": any("mask_set_shading" in r.data for r in readers)}


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), RawValue(value)


def apply_override(raw: dict, path: list[str], value) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


# train.py's flags that add a --set of their own.
FLAG_KEYS = {"model.name": "--model", "run.name": "--name", "run.report_to": "--report-to",
             "train.deterministic": "--deterministic", "model.gradient_checkpointing": "--gradient-checkpointing",
             "model.compile": "--compile"}


def check_overrides(overrides: list[str]) -> None:
    """A key given twice in --set is an error (the first value would be silently dropped)."""
    seen = {}
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key in seen:
            raise ConfigError(f"--set {key} given twice ({seen[key]}, {text}); give it once"
                              + (f" ({FLAG_KEYS[key]} sets {key})" if key in FLAG_KEYS else ""))
        seen[key] = text


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":        # `<<: *anchor` keys may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:                                   # unhashable: PyYAML's own error follows
                    continue
                if first is not None:
                    raise _DuplicateKey(f"key {key!r} given twice (line {first} and line {line})")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    """One config file's own mapping (its `base:` not followed), or a ConfigError naming the file."""
    try:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data = path.read_bytes()
    except OSError as err:                  # PermissionError (the file or its folder), an I/O error
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {err.start}); a config is YAML text") from None
    if "\0" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes); a config is YAML text")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the file name of another config, got {base!r}")
    return raw


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; `base: other.yaml` (relative to this file) is merged underneath."""
    path = Path(path)
    chain = (*_chain, path)
    if path.resolve() in [p.resolve() for p in _chain]:
        raise ConfigError(f"{chain[0]}: base cycle {' -> '.join(p.name for p in chain)}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    return deep_merge(load_yaml(path.parent / base, chain), raw) if base else raw


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Defaults that changed when the words' recipe became the dataclass defaults: a run's saved
# config.yaml from before a key existed reads the value that run trained with.
DEFAULTS_BEFORE_RECIPE = {
    "concepts": {"shape": {"fixed_norm": 0.0, "standardize": False, "logvar_init": 0.0},
                 "pose": {"fixed_norm": 0.0, "norm_to_initializer": True},
                 "appearance": {"fixed_norm": 0.0, "encoder": "cnn"}},
    "losses": {"shape": {"mask_weight": 0.1, "mask_variant": "mse_maxnorm", "offset_weight": 1e-2, "identity_weight": 0.0},
               "pose": {"offset_weight": 1e-2}, "appearance": {"offset_weight": 1e-2}},
}
# Keys that left the config: a saved config.yaml that has one drops it and says where it went.
# Each maps to (where it went, the value that place fixes, or None when any saved value is fine).
REMOVED_KEYS = {("train", "samples_per_step"): ("the samples a step trains on are the run's, in its data.json", None),
                # Sizes no config, test, experiment or documented run varied: constants in the concept's file.
                ("concepts", "pose", "heatmap_size"): ("the keypoint heatmap size is concepts/pose.py's HEATMAP_SIZE", 32),
                ("concepts", "style", "gram_channels"): ("the Gram channels are concepts/style.py's GRAM_CHANNELS", 8)}
SAVED_WORD_KEYS = ("token", "initializer", "num_vectors", "phrase", "lr", "scale", "hidden_dim", "train_rows")


def translate_older_run(raw: dict, path) -> dict:
    """A run's saved config.yaml (every key written; a user's YAML never lists them all) that lacks
    a key whose default changed since takes the value the run trained with, and says so; a key that
    left the config is dropped, with where it went."""
    for (*sections, key), (where, fixed) in REMOVED_KEYS.items():
        holder = raw
        for section in sections:
            holder = holder.get(section) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and key in holder:
            value = holder.pop(key)
            if fixed is not None and value != fixed:     # heads of another size would not load
                raise ConfigError(f"{path}: {'.'.join([*sections, key])}: {value!r} cannot be set any more "
                                  f"({where}, {fixed})")
            warnings.warn(f"{path}: {'.'.join([*sections, key])} is no longer a config key ({where}); ignored",
                          stacklevel=3)
    filled = []
    for section, words in DEFAULTS_BEFORE_RECIPE.items():
        for word, keys in words.items():
            concepts = raw.get("concepts")
            saved = concepts.get(word) if isinstance(concepts, dict) else None
            if not isinstance(saved, dict) or not all(k in saved for k in SAVED_WORD_KEYS):
                continue                                      # not a saved run's word
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            if not isinstance(raw[section].get(word), dict):
                raw[section][word] = {}
            target = raw[section][word]
            for key, value in keys.items():
                if key not in target:
                    target[key] = value
                    filled.append(f"{section}.{word}.{key}={value}")
    if filled:
        warnings.warn(f"{path}: a run from an older version; keys it lacks read as its defaults then: {', '.join(filled)}",
                      stacklevel=3)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), tokens: str | None = None) -> Config:
    raw = translate_older_run(load_yaml(path), path) if path else {}
    for text in overrides:
        apply_override(raw, *parse_override(text))
    if tokens is not None:
        raw["tokens"] = tokens
    return build_config(raw)


def config_to_dict(config: Config) -> dict:
    def clean(x):
        if isinstance(x, tuple):
            return [clean(v) for v in x]
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    data = clean(asdict(config))
    data["concepts"] = {k: clean(asdict(v)) for k, v in config.concepts.items()}
    data["losses"] = {k: clean(asdict(v)) for k, v in config.losses.items()}
    return data


def save_config(config: Config, path: str | Path) -> None:
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# Keys a resumed run may change: how long it runs and how it reports, not what it learns.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
                  "train.keep_last", "run.report_to", "run.output_dir", "run.name", "data.num_workers",
                  "data.cache_latents", "sample.", "model.compile", "model.gradient_checkpointing")


def flatten(raw: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (every leaf)."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(key, old, new) for every leaf that differs and a resume may not change."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    changed = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    allowed = [c for c in changed if any(c[0] == r or (r.endswith(".") and c[0].startswith(r)) for r in RESUMABLE_KEYS)]
    if old.train.lr_schedule != "constant" and any(k == "train.steps" for k, _, _ in allowed):
        allowed = [c for c in allowed if c[0] != "train.steps"]    # the decay would jump: say so
    return [c for c in changed if c not in allowed]


def check_resume(cfg, run_dir: Path, force: bool, checkpoint: Path | None = None,
                 trained_config: Config | None = None) -> None:
    """A resumed run trains what it trained before: the same tokens always, the same config
    (but for how long it runs and how it reports) unless forced. Raises ConfigError.
    trained_config: the run's config as it trained (default: its config.yaml)."""
    trained = load_state(checkpoint or latest_intact_checkpoint(run_dir)[0]).get("tokens", cfg.tokens)
    if trained != cfg.tokens:
        raise ConfigError(f"{run_dir} trained tokens {trained}, not {cfg.tokens}; resume with the same --tokens")
    changes = config_changes(trained_config or load_config(Path(run_dir) / "config.yaml"), cfg)
    if changes and not force:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:5])
        raise ConfigError(f"{Path(run_dir) / 'config.yaml'}: resuming with a different config ({listed}"
                          f"{'; ...' if len(changes) > 5 else ''}); pass --force to resume anyway, or --name for a new run")


# ----------------------------------------------------------------------------------------------
# --help-config: every key, its value, where the value came from, and its help
# ----------------------------------------------------------------------------------------------
def _fields_with_help(cls, prefix: str) -> dict:
    """key -> help for every leaf field of a config dataclass (nested dataclasses walked)."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_fields_with_help(hints[f.name], f"{prefix}{f.name}."))
        elif f.name not in ("concepts", "losses") or cls is not Config:
            out[f"{prefix}{f.name}"] = f.metadata.get("help", "") + _choices_text(hints[f.name])
    return out


def _choices_text(hint) -> str:
    """' [one of: a, b]' for a Literal field (optional ones too), else ''."""
    choices = [str(c) for c in choices_of(hint) if c is not None]
    return f" [one of: {', '.join(choices)}]" if choices else ""


def config_help(active: list[str] | None = None) -> dict:
    """Every config key -> its help text (the dataclasses' metadata: the one place defaults live);
    with `active`, only those concepts' keys."""
    keys = _fields_with_help(Config, "")
    for name, entry in CONCEPTS.items():
        if active is not None and name not in active:
            continue
        keys.update(_fields_with_help(entry.config, f"concepts.{name}."))
        keys.update(_fields_with_help(entry.loss_config, f"losses.{name}."))
    return keys


def config_sources(path: str | Path | None, overrides: list[str] = (), tokens: str | None = None) -> dict:
    """key -> where its value comes from: a YAML file (the one that set it, `base:` files followed),
    --set, --tokens; keys absent here take the dataclass default."""
    sources = {}

    def from_file(file: Path):
        raw = _read_yaml(file)
        base = raw.pop("base", None)
        if base:
            from_file(file.parent / base)
        for key in flatten(raw):
            sources.pop(key, None)          # the last setter goes last
            sources[key] = str(file)

    if path:
        load_yaml(path)                 # the same errors as loading
        from_file(Path(path))
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        sources.pop(key, None)
        sources[key] = f"--set {text}"
    if tokens is not None:
        sources.pop("tokens", None)
        sources["tokens"] = f"--tokens {tokens}"
    return sources


def explain_config(config: Config, sources: dict) -> str:
    """The resolved config, one key a line, with its source and help (what --help-config prints)."""
    data, lines = config_to_dict(config), []
    for key, help_text in config_help(config.tokens).items():     # only the active concepts' keys
        value = _lookup(data, key)
        # The last thing that set it (a file, then --set, then --tokens), or a part of it (a dict key).
        source = next((s for k, s in reversed(sources.items()) if k == key or k.startswith(key + ".")), "default")
        lines.append(f"{key} = {value!r}    [{source}]")
        if help_text:
            lines.append(f"    {help_text}")
    return "\n".join(lines)


def _lookup(data: dict, key: str):
    node = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
