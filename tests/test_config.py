"""YAML -> dataclasses, overrides, clear errors, and the saved resolved config."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guided_concepts.concepts import CONCEPTS
from guided_concepts.configs.schema import ConfigError, Config, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config) and config.tokens


def test_ablation_overrides_only_what_it_names():
    base = load_config(CONFIGS / "base.yaml")
    ablation = load_config(CONFIGS / "ablations" / "shape_mask_loss.yaml")
    assert ablation.losses["shape"].mask_weight == 0.1 and base.losses["shape"].mask_weight == 0
    assert ablation.losses["shape"].mask_variant == "mse_maxnorm" != base.losses["shape"].mask_variant
    assert ablation.losses["shape"].identity_weight == base.losses["shape"].identity_weight
    assert ablation.train == base.train and ablation.concepts == base.concepts


def test_overrides_and_types():
    assert load_config(CONFIGS / "base.yaml", ["concepts.shape.lr=1e-2"]).concepts["shape"].lr == 0.01
    config = load_config(CONFIGS / "base.yaml", ["train.steps=7", "losses.shape.mask_weight=1",
                                                   "attention.resolutions=[16]", "data.root=/x"], tokens="shape")
    assert config.train.steps == 7
    assert config.losses["shape"].mask_weight == 1.0 and isinstance(config.losses["shape"].mask_weight, float)
    assert config.attention.resolutions == [16] and config.data.root == "/x"


@pytest.mark.parametrize("override, message", [
    ("train.stepz=1", "unknown key train.stepz; valid keys of train: steps, batch_size"),
    ("nosuch.key=1", "unknown key nosuch; valid keys: tokens, model"),
    ("concepts.shape.tokn=x", "unknown key concepts.shape.tokn; valid keys of concepts.shape: token"),
    ("concepts.colour.token=x", f"unknown key concepts.colour; valid keys of concepts: {', '.join(CONCEPTS)}"),
    ("train.steps=1.5", "train.steps: expected int, got 1.5"),
    ("train.union_sampling=maybe", "train.union_sampling: expected bool"),
    ("model.mixed_precision=fp8", "model.mixed_precision: 'fp8' is not one of"),
    ("train.steps", "expected section.key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(CONFIGS / "base.yaml", [override])


def test_string_fields_keep_override_text():
    config = load_config(CONFIGS / "base.yaml", ["run.name=001", "data.root=/data/a: b", "run.output_dir=on",
                                                   "model.image_encoder=null"])
    assert config.run.name == "001" and config.data.root == "/data/a: b" and config.run.output_dir == "on"
    assert config.model.image_encoder is None


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS / "base.yaml", ["train.steps=11", "losses.shape.mask_t_range=[0,200]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_every_config_field_has_help():
    from guided_concepts.configs import schema
    classes = [schema.ModelConfig, schema.DataConfig, schema.PromptConfig, schema.AttentionConfig,
               schema.TrainConfig, schema.SampleConfig, schema.RunConfig]
    classes += [c for spec in CONCEPTS.values() for c in spec[1:]]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_help_config_lists_every_key_with_its_help_and_source(tmp_path, capsys):
    from guided_concepts import train
    from guided_concepts.configs.schema import config_help
    ablation = Path(__file__).resolve().parent.parent / "configs" / "ablations" / "shape_mask_loss.yaml"
    out = train.main(["--config", str(ablation), "--help-config", "--tokens", "shape,pose", "--set", "train.steps=7",
                      "--set", f"run.output_dir={tmp_path / 'runs'}"])
    printed = capsys.readouterr().out
    assert out is None and not (tmp_path / "runs").exists()               # a dry run: nothing written
    lines = printed.splitlines()
    keys = {line.split(" = ")[0]: line for line in lines if not line.startswith(" ")}
    helps = config_help(["shape", "pose"])
    assert set(keys) == set(helps) and len(helps) > 80
    assert any(k.startswith("concepts.pose.") for k in keys) and any(k.startswith("losses.shape.") for k in keys)
    assert not any(k.startswith(("concepts.appearance.", "losses.appearance.", "concepts.style.")) for k in keys)
    for key, text in helps.items():                     # every key's help printed under it
        assert lines[lines.index(keys[key]) + 1].strip() == text, key
    assert keys["train.steps"] == "train.steps = 7    [--set train.steps=7]"
    assert keys["tokens"].endswith("[--tokens shape,pose]")
    assert keys["train.seed"].endswith("[default]")
    mask_weight = next(k for k in keys if k == "losses.shape.mask_weight")
    assert keys[mask_weight].endswith(f"[{ablation}]")                     # the ablation file sets it
    assert keys["model.name"].endswith("[default]")                        # configs/base.yaml sets nothing
    decoupled = ablation.parent / "shape_decoupled_pairs.yaml"
    train.main(["--config", str(decoupled), "--help-config", "--set", f"run.output_dir={tmp_path / 'runs'}"])
    keys = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")}
    assert keys["data.decouple"].endswith(f"[{decoupled}]")
    assert keys["model.name"].endswith("toyworld2.yaml]")                  # ... its `base:` file this one


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_hold_only_what_differs(path):
    """Defaults live in the dataclasses: a config sets a key only to change it (from the default,
    or from its `base:` file's value)."""
    import yaml
    from guided_concepts.configs.schema import _lookup, config_to_dict, flatten
    own = yaml.safe_load(path.read_text()) or {}
    base = own.pop("base", None)
    underneath = config_to_dict(load_config(path.parent / base if base else None))
    repeated = [k for k, v in flatten(own).items() if k != "tokens" and _lookup(underneath, k) == v]
    assert not repeated, f"{path.name} repeats {repeated}"


ALL_WORDS = ",".join(CONCEPTS)
CONFIG_PAGE_COMMAND = f"python train.py --config configs/base.yaml --tokens {ALL_WORDS} --help-config"


def test_the_config_reference_page_is_what_help_config_prints(capsys, monkeypatch):
    """docs/config.md holds --help-config's output for the default config with every word; a key,
    default or help text changed without the page fails here."""
    from guided_concepts import train
    monkeypatch.chdir(CONFIGS.parent)
    train.main(["--config", "configs/base.yaml", "--tokens", ALL_WORDS, "--help-config"])
    printed = capsys.readouterr().out
    page = (CONFIGS.parent / "docs" / "config.md").read_text()
    assert CONFIG_PAGE_COMMAND in page
    block = page.split("```text\n", 1)[1].split("```", 1)[0]
    assert block == printed, f"docs/config.md is stale; regenerate its block with: {CONFIG_PAGE_COMMAND}"


def test_an_initializer_that_is_not_one_token_is_refused_when_the_config_is_built(tmp_path):
    """The vocabulary step of adding a concept: checked from the model's tokenizer files before any
    model loads (here a dry run on ToyWorld), naming the key; a one-token word passes."""
    from guided_concepts import train
    base = ["--config", str(CONFIGS / "base.yaml"), "--set", f"run.output_dir={tmp_path}", "--help-config"]
    with pytest.raises(SystemExit, match=r"concepts.pose.initializer: 'xylophone' is \d+ tokens in .*tokenizer"):
        train.main([*base, "--set", "concepts.pose.initializer=xylophone"])
    assert train.main([*base, "--set", "concepts.pose.initializer=chair"]) is None
    assert not any(tmp_path.iterdir())


def test_every_word_shares_one_word_loss_config_and_a_per_view_word_takes_no_targets():
    from guided_concepts.concepts.base import WordLossConfig
    assert all(issubclass(entry.loss_config, WordLossConfig) for entry in CONCEPTS.values())
    with pytest.raises(ConfigError, match="losses.pose.target_weight: the pose word is not one per object"):
        load_config(CONFIGS / "base.yaml", ["losses.pose.target_weight=1"])
