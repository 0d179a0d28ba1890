"""Config files and --set values that are wrong in ways YAML or Python would not say clearly:
each is a ConfigError naming the file (or key), and train.py says it in one `error:` line."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from guided_concepts import train
from guided_concepts.configs.schema import (ConfigError, check_overrides, config_sources, load_config,
                                            load_yaml)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(folder: Path, files: dict) -> dict:
    """name -> text (or bytes) written under folder; returns name -> path."""
    out = {}
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = path
    return out


def fails_in_train(config: Path, message: str, tmp_path: Path, *extra: str) -> None:
    """train.py stops with one `error: ...` line matching `message`, writing nothing."""
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as caught:
        train.main(["--config", str(config), "--set", f"run.output_dir={out}", *extra])
    text = str(caught.value)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text
    assert not out.exists()


@pytest.mark.parametrize("files, start, chain", [
    ({"a.yaml": "base: b.yaml\ntrain: {steps: 3}\n", "b.yaml": "base: a.yaml\n"}, "a.yaml", "a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: a.yaml\n"}, "a.yaml", "a.yaml -> a.yaml"),
    ({"top.yaml": "base: sub/a.yaml\n", "sub": None, "sub/a.yaml": "base: ../sub/b.yaml\n", "sub/b.yaml": "base: a.yaml\n"},
     "top.yaml", "top.yaml -> a.yaml -> b.yaml -> a.yaml"),
])
def test_base_cycle_is_an_error_naming_the_chain(tmp_path, files, start, chain):
    for name, text in files.items():
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.yaml")}
    message = re.escape(f"{tmp_path / start}: base cycle {chain}")
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(tmp_path / start)
    with pytest.raises(ConfigError, match=message):
        config_sources(tmp_path / start)                    # --help-config's source listing too
    fails_in_train(tmp_path / start, message, tmp_path / "t")
    fails_in_train(tmp_path / start, message, tmp_path / "h", "--help-config")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.yaml")} == before


@pytest.mark.parametrize("value, shown", [("[base.yaml]", "['base.yaml']"), ("3", "3"), ("{file: base.yaml}", "{'file': 'base.yaml'}")])
def test_base_must_be_a_file_name(tmp_path, value, shown):
    path = write(tmp_path, {"c.yaml": f"base: {value}\ntrain: {{steps: 3}}\n"})["c.yaml"]
    message = re.escape(f"{path}: base: expected the file name of another config, got {shown}")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    fails_in_train(path, message, tmp_path)


def test_a_shared_base_is_no_cycle(tmp_path):
    """Two files basing the same file, and a file basing a base: only a repeat in one chain is a cycle."""
    files = write(tmp_path, {"root.yaml": "train: {steps: 5}\n", "mid.yaml": "base: root.yaml\ntrain: {seed: 2}\n",
                             "leaf.yaml": "base: mid.yaml\n", "other.yaml": "base: root.yaml\n"})
    assert load_config(files["leaf.yaml"]).train.steps == 5 and load_config(files["leaf.yaml"]).train.seed == 2
    assert load_config(files["other.yaml"]).train.steps == 5


@pytest.mark.parametrize("text, key, lines", [
    ("tokens: [shape]\ntokens: [pose]\n", "tokens", (1, 2)),
    ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n", "steps", (2, 4)),                          # nested
    ("losses:\n  shape:\n    mask_weight: 0.1\n\n    mask_weight: 0.2\n", "mask_weight", (3, 5)),   # deeper
    ("train: {steps: 3, steps: 4}\n", "steps", (1, 1)),                                          # flow, one line
    ("train:\n  steps: 3\ntrain:\n  seed: 1\n", "train", (1, 3)),                                # a section twice
])
def test_duplicate_yaml_keys_are_errors_naming_file_key_and_lines(tmp_path, text, key, lines):
    path = write(tmp_path, {"dup.yaml": text})["dup.yaml"]
    message = re.escape(f"{path}: key '{key}' given twice (line {lines[0]} and line {lines[1]})")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    fails_in_train(path, message, tmp_path)
    assert path.read_text() == text


def test_duplicate_key_in_a_base_file_names_that_file(tmp_path):
    files = write(tmp_path, {"top.yaml": "base: b.yaml\n", "b.yaml": "train:\n  steps: 3\n  steps: 4\n"})
    with pytest.raises(ConfigError, match=re.escape(f"{files['b.yaml']}: key 'steps' given twice (line 2 and line 3)")):
        load_yaml(files["top.yaml"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: *anchor` then the same key is YAML's way to override a merged value: not a duplicate."""
    path = write(tmp_path, {"m.yaml": "defaults: &d {steps: 3, seed: 1}\n"})["m.yaml"]
    assert load_yaml(path) == {"defaults": {"steps": 3, "seed": 1}}
    path.write_text("x: &d {steps: 3, seed: 1}\ntrain:\n  <<: *d\n  steps: 4\n")
    assert load_yaml(path)["train"] == {"steps": 4, "seed": 1}


def test_duplicate_set_keys_are_errors():
    with pytest.raises(ConfigError, match=re.escape("--set train.steps given twice (train.steps=3, train.steps=4)")):
        check_overrides(["train.steps=3", "data.holdout=1", "train.steps=4"])
    with pytest.raises(ConfigError, match=re.escape("--set run.name given twice (run.name=a, run.name=b); "
                                                    "give it once (--name sets run.name)")):
        check_overrides(["run.name=a", "run.name=b"])
    check_overrides(["train.steps=3", "train.seed=3", "losses.shape.mask_weight=1", "losses.pose.mask_weight=1"])


@pytest.mark.parametrize("override", ["data.root=", "data.root=  "])
def test_empty_data_root_is_an_error(override, tmp_path):
    message = re.escape("data.root: empty; give a folder, or 'toyworld', or null for the bundled chairs")
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "base.yaml", [override])
    fails_in_train(CONFIGS / "base.yaml", message, tmp_path, "--set", override)


def test_empty_data_root_in_a_file_is_an_error_but_null_is_not(tmp_path):
    files = write(tmp_path, {"e.yaml": 'data:\n  root: ""\n', "n.yaml": "data:\n  root: null\n"})
    with pytest.raises(ConfigError, match="data.root: empty"):
        load_config(files["e.yaml"])
    assert load_config(files["n.yaml"]).data.root is None
    assert load_config(CONFIGS / "base.yaml", ["data.root=null"]).data.root is None
    assert load_config(CONFIGS / "tiny.yaml").data.root is None       # the tiny config: the bundled chairs
    assert load_config(None).data.root == "toyworld"                # unset: the default run's ToyWorld chairs
    assert load_config(CONFIGS / "base.yaml", ["data.root=toyworld"]).data.root == "toyworld"


@pytest.mark.parametrize("content, why", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 at byte 0"),
    (b"train:\n  steps: 3\n\xff\xfe\n", "not UTF-8 at byte 18"),
    (b"train:\x00\x00\x00\x00steps", "it holds NUL bytes"),
])
def test_a_config_that_is_not_text_is_named(tmp_path, content, why):
    path = write(tmp_path, {"c.yaml": content})["c.yaml"]
    message = re.escape(f"{path}: not a text file ({why})")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    fails_in_train(path, message, tmp_path)
    assert path.read_bytes() == content


def test_utf8_text_with_non_ascii_still_loads(tmp_path):
    path = write(tmp_path, {"u.yaml": "# Größe: für alle\nrun: {name: stühle}\n"})["u.yaml"]
    assert load_config(path).run.name == "stühle"


def test_an_unreadable_config_is_named(tmp_path, monkeypatch):
    path = write(tmp_path, {"c.yaml": "train: {steps: 3}\n"})["c.yaml"]
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):              # root reads it anyway: have the read fail as it would
            real = Path.read_bytes

            def denied(self):
                if self == path:
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self)
            monkeypatch.setattr(Path, "read_bytes", denied)
        message = re.escape(f"{path}: cannot read the config file (Permission denied)")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        fails_in_train(path, message, tmp_path)
    finally:
        path.chmod(0o644)
    assert path.read_text() == "train: {steps: 3}\n"


def test_empty_sections_load_and_choices_are_checked_in_python_too(tmp_path):
    """A YAML whose concepts:/losses: sections are empty (every child commented out) loads as
    before; a choice field built directly in Python is checked like the loader checks it."""
    from guided_concepts.backbone.adapters import AdapterConfig
    from guided_concepts.concepts.shape import ShapeConfig
    path = tmp_path / "empty.yaml"
    path.write_text("concepts:\n#  shape:\n#    lr: 1.0e-3\nlosses:\n")
    assert load_config(path).concepts["shape"].lr == ShapeConfig().lr
    with pytest.raises(ValueError, match="AdapterConfig.kind: 'E4T' is not one of none, lora, e4t"):
        AdapterConfig(kind="E4T")
    with pytest.raises(ValueError, match="ShapeConfig.encoder: 'sets' is not one of set, view, none"):
        ShapeConfig(encoder="sets")
