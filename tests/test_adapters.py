"""UNet adapters (LoRA through peft, E4T weight offsets), the two training phases, and
per-object tuning artefacts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guided_concepts import generate
from guided_concepts import train
from guided_concepts import tune
from guided_concepts.backbone import load_backbone
from guided_concepts.backbone.adapters import AdapterConfig, UNetAdapters


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("kind", ["lora", "e4t"])
@pytest.mark.parametrize("layers", ["cross_kv", "cross_kv_self_qkv"])
def test_zero_initialised_adapters_reproduce_the_base_unet(tiny_model_dir, kind, layers):
    backbone = load_backbone(str(tiny_model_dir))
    x, t, e = unet_inputs()
    with torch.no_grad():
        base = backbone.unet(x, t, e).sample
    adapters = UNetAdapters(backbone.unet, AdapterConfig(kind=kind, layers=layers, rank=2))
    assert adapters.targets and all(("attn2" in n) or layers != "cross_kv" for n in adapters.targets)
    assert len(adapters.parameters()) == 2 * len(adapters.targets)
    with torch.no_grad():
        assert torch.equal(backbone.unet(x, t, e).sample, base)
    assert not any(p.requires_grad for p in adapters.parameters())           # phase 1: frozen


@pytest.mark.parametrize("kind", ["lora", "e4t"])
def test_exported_lora_loads_in_diffusers_and_matches_the_adapted_unet(tiny_model_dir, tmp_path, kind):
    from diffusers import StableDiffusionPipeline
    backbone = load_backbone(str(tiny_model_dir))
    adapters = UNetAdapters(backbone.unet, AdapterConfig(kind=kind, rank=2))
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    x, t, e = unet_inputs()
    with torch.no_grad():
        adapted = backbone.unet(x, t, e).sample
    path = adapters.export_lora(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        base = pipe.unet(x, t, e).sample
    pipe.load_lora_weights(str(path.parent))
    with torch.no_grad():
        loaded = pipe.unet(x, t, e).sample
    assert not torch.allclose(loaded, base, atol=1e-4)                        # it changes the output
    assert torch.allclose(loaded, adapted, atol=1e-4)                         # exactly as trained
    assert path.stat().st_size < 200_000                                      # adapters stay small


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir, chairs_dir):
    out = tmp_path_factory.mktemp("adapters")
    return train.main(["--name", "a", "--set", f"run.output_dir={out}", "--set", "adapters.kind=e4t",
                       "--set", "adapters.start_step=2", "--set", "adapters.lr=1e-2", "--set", "train.steps=4",
                       "--set", "adapters.head_lr_scale=0.5",
                       "--set", "train.checkpoint_every=2", "--set", "train.log_every=2", "--set", "train.sample_every=0",
                       "--set", "sample.steps=1"])


def test_phases_train_heads_then_adapters_and_only_those_change(adapter_run, tiny_model_dir):
    records = [json.loads(line) for line in (adapter_run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert "lr/adapters" not in steps[2] and steps[4]["lr/adapters"] == 1e-2    # group added at the switch
    assert steps[4]["lr/shape"] == steps[2]["lr/shape"] * 0.5                   # phase 2's head lr
    phase1 = load_file(str(adapter_run / "checkpoints" / "step_000002" / "adapters.safetensors"))
    phase2 = load_file(str(adapter_run / "checkpoints" / "step_000004" / "adapters.safetensors"))
    ups = [k for k in phase1 if k.endswith(".up")]
    assert all(not phase1[k].any() for k in ups)                             # phase 1: still zero
    assert any(phase2[k].abs().sum() > 0 for k in ups)                       # phase 2: trained
    optimizer = torch.load(adapter_run / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=False)
    groups = optimizer["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["shape", "adapters"]
    assert optimizer["optimizer"]["state"][0]["step"] == 4                   # heads kept their Adam state
    # The frozen base weights did not move.
    system, _ = generate.load_run(adapter_run)
    base = load_backbone(str(tiny_model_dir))
    trained = dict(system.backbone.unet.named_parameters())
    for name, value in base.unet.named_parameters():
        key = name.replace("attn2.to_k.weight", "attn2.to_k.base.weight").replace("attn2.to_v.weight", "attn2.to_v.base.weight")
        assert torch.equal(trained[key], value), name


def test_per_object_tuning_artefact_saves_loads_and_generates(adapter_run, chairs_dir, tmp_path):
    info = tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=3, out_dir=tmp_path / "obj")
    art = tmp_path / "obj"
    assert {p.name for p in art.iterdir()} == {"heads.safetensors", "adapters.safetensors", "tokens", "lora",
                                               "artefact.json"}
    saved = json.loads((art / "artefact.json").read_text())
    assert saved["steps"] == 3 and saved["bytes"] == info["bytes"] > 0
    assert saved["tune_losses"] == {"shape": {"mask_weight": 0.0}}           # the seeds: no mask loss in tuning
    assert info["denoise_after"] != info["denoise_before"]
    system, cfg = generate.load_run(adapter_run, artefact=art)
    tuned = load_file(str(art / "adapters.safetensors"))
    current = system.adapters.state_dict()
    assert all(torch.equal(current[k], tuned[k]) for k in tuned)
    _, images, _ = generate.generate(system, cfg, "a photo of a chair in the shape of *s",
                                     {"shape": chairs_dir / "chair_011"}, num=1, steps=2)
    assert images.shape == (1, 3, 64, 64)
    baseline = tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=3, out_dir=tmp_path / "ti",
                                mode="textual_inversion")
    assert baseline["mode"] == "textual_inversion" and (tmp_path / "ti" / "tokens" / "shape.safetensors").is_file()


def test_hue_jittered_tuning_turns_colours_and_checks_its_range(adapter_run, chairs_dir, tmp_path):
    from guided_concepts.configs.schema import ConfigError
    images = torch.tensor([[1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]).view(2, 3, 1, 1).repeat(8, 1, 1, 1)   # red, white
    turned = tune.shift_hue(images, 0.5, torch.Generator().manual_seed(0))
    assert not torch.allclose(turned[0::2], images[0::2], atol=0.1)             # the reds change colour ...
    assert torch.allclose(turned[1::2], images[1::2], atol=1e-5)                 # ... white stays white
    info = tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "hue",
                            overrides={"hue_jitter": 0.5})
    assert info["denoise_after"] != info["denoise_before"]
    with pytest.raises(ConfigError, match="tune.hue_jitter: 0.8 is not in"):
        tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "bad",
                         overrides={"hue_jitter": 0.8})
    assert not (tmp_path / "bad").exists()


def test_tuning_keeps_the_domain_statistics_of_a_standardised_shape_code(tmp_path, chairs_dir):
    """One object's views cannot supply statistics across objects: tuning leaves the standardised
    code's running statistics as the domain run left them, and the tuned word still differs
    between objects."""
    run = train.main(["--name", "std", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=3",
                      "--set", "concepts.shape.standardize=true", "--set", "concepts.shape.fixed_norm=0.5",
                      "--set", "train.sample_every=0", "--set", "sample.steps=1"])
    before = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "heads.safetensors"))
    tune.tune_object(run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "obj")
    after = load_file(str(tmp_path / "obj" / "heads.safetensors"))
    stats = [k for k in before if "standardize.running" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))   # it did tune


@pytest.mark.slow
def test_word_targets_from_tuning_pull_the_encoders_words_toward_them(tmp_path, chairs_dir):
    """tune.py --targets tunes each training object (not the held-out ones) and keeps the
    object-level words; a run with losses.shape.target_weight then ends closer to them than the
    same run without the pull."""
    from safetensors import safe_open

    from guided_concepts.toyworld.probes import encode_word
    common = ["--set", f"run.output_dir={tmp_path}", "--set", "train.sample_every=0", "--set", "sample.steps=1",
              "--set", "concepts.shape.fixed_norm=0.5", "--set", "data.holdout=2"]
    domain = train.main(["--name", "domain", "--tokens", "shape,pose", "--set", "train.steps=2", *common])
    targets = tmp_path / "targets.safetensors"
    info = tune.tune_targets(domain, targets, steps=3, progress=lambda line: None)
    with safe_open(str(targets), "pt") as f:
        keys = set(f.keys())
    training = sorted(p.name for p in chairs_dir.iterdir() if p.is_dir())[:-2]
    assert keys == {f"shape/{name}" for name in training}                    # no pose (a word per view), no held-out
    assert info["objects"] == len(training) and info["concepts"] == ["shape"]

    def distance(run):
        system, cfg = generate.load_run(run)
        words = load_file(str(targets))
        return sum(1 - torch.nn.functional.cosine_similarity(encode_word(system, cfg, "shape", chairs_dir / n),
                                                            words[f"shape/{n}"]).mean().item() for n in training[:4])
    pulled = ["--set", f"train.word_targets={targets}", "--set", "train.steps=8", "--set", "concepts.shape.lr=1e-2"]
    free = train.main(["--name", "free", "--tokens", "shape,pose", *common, *pulled])
    with_pull = train.main(["--name", "pull", "--tokens", "shape,pose", *common, *pulled,
                            "--set", "losses.shape.target_weight=10"])
    logged = [json.loads(line) for line in (with_pull / "metrics.jsonl").read_text().splitlines()]
    assert any("shape/word_target" in r for r in logged)
    assert distance(with_pull) < 0.5 * distance(free)


@pytest.mark.parametrize("targets, message", [("", "needs train.word_targets"), ("missing.safetensors", "does not exist"),
                                              ("bad.safetensors", "not a readable safetensors")])
def test_a_target_pull_without_usable_targets_stops_before_the_run_folder_exists(tmp_path, targets, message):
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    path = str(tmp_path / targets) if targets else ""
    with pytest.raises(SystemExit) as stopped:
        train.main(["--name", "t", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "train.steps=1",
                    "--set", "losses.shape.target_weight=1", "--set", f"train.word_targets={path}"])
    assert message in str(stopped.value.code) and (not targets or targets in str(stopped.value.code))
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.slow
def test_fitting_the_heads_to_target_words_writes_a_new_run_closer_to_them(tmp_path, chairs_dir):
    """tune.py --fit (HyperDreamBooth's regression phase): the fitted run's words for the training
    objects are far closer to the targets than the run's own; the original run is untouched, the new
    one loads and generates, batch norm statistics stay the run's, and an existing --out is refused."""
    from guided_concepts.toyworld.probes import encode_word
    common = ["--set", f"run.output_dir={tmp_path}", "--set", "train.sample_every=0", "--set", "sample.steps=1",
              "--set", "data.holdout=2", "--set", "concepts.shape.standardize=true"]
    domain = train.main(["--name", "domain", "--tokens", "shape,pose", "--set", "train.steps=2", *common])
    training = sorted(p.name for p in chairs_dir.iterdir() if p.is_dir())[:-2]
    g = torch.Generator().manual_seed(0)
    system, _ = generate.load_run(domain)
    dim = system.table.embedding_dim
    targets = tmp_path / "targets.safetensors"
    from guided_concepts.tokens.targets import save_word_targets
    save_word_targets(targets, {"shape": {n: torch.randn(1, dim, generator=g) for n in training}})
    heads_before = load_file(str(domain / "checkpoints" / "step_000002" / "heads.safetensors"))

    def distance(run):
        system, cfg = generate.load_run(run)
        words = load_file(str(targets))
        return sum(1 - torch.nn.functional.cosine_similarity(encode_word(system, cfg, "shape", chairs_dir / n),
                                                            words[f"shape/{n}"]).mean().item() for n in training)
    fitted = Path(tune.main(["--run", str(domain), "--fit", str(targets), "--steps", "60", "--lr", "3e-3",
                             "--out", str(tmp_path / "fitted")])["path"])
    assert distance(fitted) < 0.5 * distance(domain)
    after = load_file(str(fitted / "checkpoints" / "step_000002" / "heads.safetensors"))
    assert all(torch.equal(heads_before[k], load_file(str(domain / "checkpoints" / "step_000002" / "heads.safetensors"))[k])
               for k in heads_before)                                       # the original run is untouched
    stats = [k for k in after if "running_" in k]
    assert stats and all(torch.equal(heads_before[k], after[k]) for k in stats)
    assert any(not torch.equal(heads_before[k], after[k]) for k in after if k.startswith("shape.") and k.endswith("weight"))
    assert all(torch.equal(heads_before[k], after[k]) for k in after if k.startswith("pose."))    # a word per view: not fitted
    assert not (fitted / "tokens").exists() and json.loads((fitted / "fit_targets.json").read_text())["objects"] == len(training)
    chair = chairs_dir / training[0]
    assert generate.main(["--run", str(fitted), "--prompt", "a chair in the shape of *s", "--shape-from", str(chair),
                          "--num", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]).exists()
    with pytest.raises(SystemExit, match="exists; the fitted run is written to a new folder"):
        tune.main(["--run", str(domain), "--fit", str(targets), "--out", str(fitted)])


def test_more_views_tune_on_every_folder_each_prompt_naming_its_own_category(adapter_run, chairs_dir, tmp_path,
                                                                          monkeypatch):
    """tune.py --more-views: the object's words tune on its own views and on every folder given
    (here another chair's views labelled a table), each prompt naming its folder's category; the
    word is still written from the object's own first view. A folder without objects, or a
    --targets folder missing a training object, is refused before any tuning."""
    import shutil
    from guided_concepts.objectdata import DataError
    more = tmp_path / "more"
    shutil.copytree(chairs_dir / "chair_003", more / "as_table")
    meta = json.loads((more / "as_table" / "meta.json").read_text())
    (more / "as_table" / "meta.json").write_text(json.dumps({**meta, "category": "table"}))
    seen = []
    prompts_for = tune.prompts_for

    def record(*args, **kwargs):
        prompts = prompts_for(*args, **kwargs)
        seen.extend(prompts)
        return prompts
    monkeypatch.setattr(tune, "prompts_for", record)
    alone = tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "alone")
    assert not any("table" in p for p in seen)
    both = tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "both", more_views=more)
    assert both["views"] == 2 * alone["views"] and both["more_views"] == str(more)
    assert any("table" in p for p in seen) and any("chair" in p for p in seen[len(seen) // 2:])
    words = [load_file(str(tmp_path / d / "tokens" / "shape.safetensors")) for d in ("alone", "both")]
    assert not all(torch.equal(words[0][k], words[1][k]) for k in words[0])             # the extra views did tune
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no object folders"):
        tune.tune_object(adapter_run, chairs_dir / "chair_011", steps=2, out_dir=tmp_path / "x", more_views=tmp_path / "empty")
    with pytest.raises(DataError, match="no folder for .* training objects"):
        tune.tune_targets(adapter_run, tmp_path / "t.safetensors", steps=1, more_views=more, progress=lambda line: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "t.safetensors").exists()


def test_targets_and_fit_on_more_objects_than_the_run_trained_on_but_never_its_held_out_ones(adapter_run, chairs_dir,
                                                                                          tmp_path):
    """tune.py --targets/--fit --objects DIR: HyperDreamBooth's regression phase on any object set
    (more objects than the run's own), keyed by DIR's names; a DIR holding one of the run's
    held-out objects is refused before anything is tuned or written."""
    import shutil
    from safetensors import safe_open

    from guided_concepts.configs.schema import ConfigError
    from guided_concepts.objectdata import DataError
    more = tmp_path / "more"
    for name, new in (("chair_001", "extra_a"), ("chair_002", "extra_b")):
        shutil.copytree(chairs_dir / name, more / new)
    targets = tmp_path / "targets.safetensors"
    info = tune.tune_targets(adapter_run, targets, steps=1, objects_dir=more, progress=lambda line: None)
    with safe_open(str(targets), "pt") as f:
        assert {k.split("/")[1] for k in f.keys()} == {"extra_a", "extra_b"}
    assert info["objects"] == 2 and info["objects_dir"] == str(more)
    fitted = tune.fit_heads_to_targets(adapter_run, targets, tmp_path / "fit", steps=2, objects_dir=more,
                                       progress=lambda line: None)
    assert fitted["objects"] == 2 and (tmp_path / "fit" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="no target words"):      # the run's own objects have none in this file
        tune.fit_heads_to_targets(adapter_run, targets, tmp_path / "fit2", steps=2, progress=lambda line: None)
    with pytest.raises(DataError, match="held-out object"):
        tune.tune_targets(adapter_run, tmp_path / "t2.safetensors", steps=1, objects_dir=chairs_dir,
                          progress=lambda line: None)
    assert not (tmp_path / "t2.safetensors").exists() and not (tmp_path / "fit2").exists()
