"""The joint loop end to end on the tiny model: run folders, checkpoints, resume, bad input,
what trains and what stays frozen, and the mask loss measured against weight 0."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.metrics import attention_mask_metrics
from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
from tests.conftest import make_system, with_settings
from guided_concepts.prompts import prompts_for
from guided_concepts.backbone.latents import LatentCache, encode_latents
from guided_concepts.objective import training_losses

QUICK = ["--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.log_every=2",
         "--set", "train.checkpoint_every=2", "--set", "train.sample_every=2", "--set", "sample.steps=2"]


def args(out, name, *extra):
    return with_settings(["--name", name, "--set", f"run.output_dir={out}", *QUICK], *extra)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, chairs_dir):
    out = tmp_path_factory.mktemp("runs")
    return train.main(args(out, "r")), out


def test_run_folder_layout(trained_run):
    run, _ = trained_run
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoints", "samples", "metrics.jsonl", "tokens"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert {p.name for p in (run / "checkpoints" / "step_000004").iterdir()} == {"heads.safetensors", "optimizer.pt", "state.json"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    assert {"denoise", "shape/mask_attention", "shape/offset_l2", "lr/shape"} <= set(train_lines[0])
    assert any("val/shape/mass_inside@t100" in r for r in records)
    assert (run / "tokens" / "chair_000" / "shape.safetensors").is_file()


def test_saved_run_reloads_to_identical_embeddings(trained_run, chairs_dir):
    """Heads written by training and read back by generate.load_run give the same words."""
    run, _ = trained_run
    system, cfg = generate.load_run(run)
    from guided_concepts.concepts import CONCEPTS
    batch = generate.reference_batch(chairs_dir / "chair_003", 0, cfg.data.resolution,
                                     CONCEPTS["shape"].concept.requirements(cfg.concepts["shape"]).data, cfg.concepts["shape"].max_views)
    with torch.no_grad():
        embeds = system.heads["shape"].encode(batch).embeds[0]
    exported = load_file(str(run / "tokens" / "chair_003" / "shape.safetensors"))["*s"]
    assert torch.allclose(embeds, exported, atol=1e-6)
    initializer = system.table.initializer_rows["shape"]
    assert not torch.allclose(embeds[0], initializer)        # training moved it


def test_resume_continues_the_step_count(trained_run, capsys):
    run, out = trained_run
    train.main(["--name", "r", "--set", f"run.output_dir={out}", "--set", "train.steps=6", "--resume"])
    assert "resumed" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_000006").is_dir()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and 5 not in steps[:-3] and steps.count(4) >= 1
    assert json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())["step"] == 6


def test_existing_run_is_never_overwritten(trained_run):
    run, out = trained_run
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already exists"):
        train.main(args(out, "r"))
    assert (run / "metrics.jsonl").read_text() == before


def test_only_heads_and_placeholder_rows_train(fresh_backbone, chair_batch):
    system = make_system(fresh_backbone, concepts={"shape": {"num_vectors": 2, "lr": 1e-2}})
    frozen = {f"{i}.{k}": v.clone() for i, m in enumerate(fresh_backbone.frozen_modules())
              for k, v in m.state_dict().items()}
    heads_before = {k: v.clone() for k, v in system.trainable_state().items()}
    trainable = [p for p in system.heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, ["shape"], random.Random(0))
    for _ in range(2):
        terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        sum(w * v.mean() for w, v in terms.values()).backward()
        head = system.heads["shape"].head
        assert all(head.rows.grad[k].abs().sum() > 0 for k in range(2))          # every vector
        assert head.mlp[-1].weight.grad.abs().sum() > 0
        optimizer.step()
    for name, value in (m for i, mod in enumerate(fresh_backbone.frozen_modules())
                        for m in ((f"{i}.{k}", v) for k, v in mod.state_dict().items())):
        assert torch.equal(value, frozen[name]), name
    assert all(not p.requires_grad for m in fresh_backbone.frozen_modules() for p in m.parameters())
    after = system.trainable_state()
    assert all(not torch.equal(after[k], heads_before[k]) for k in after if k.endswith(("rows", "mlp.3.weight")))


def test_frozen_modules_in_bf16_heads_stay_fp32(fresh_backbone, chair_batch):
    system = make_system(fresh_backbone)
    for module in fresh_backbone.frozen_modules():
        module.to(torch.bfloat16)
    prompts = ["a photo of a chair in the shape of *s"] * len(chair_batch["category"])
    terms = training_losses(system, chair_batch, prompts)
    sum(w * v.float().mean() for w, v in terms.values()).backward()
    params = [p for p in system.heads.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.slow
def test_wandb_offline_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = train.main(args(tmp_path, "w", "--report-to", "wandb", "--set", "train.steps=2"))
    assert list((run / "wandb").glob("offline-run-*"))


def test_generate_writes_a_grid_and_rejects_untrained_words(trained_run, chairs_dir, tmp_path):
    run, _ = trained_run
    out = generate.main(["--run", str(run), "--prompt", "a red chair in the shape of *s", "--shape-from",
                         str(chairs_dir / "chair_011"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")])
    from PIL import Image
    assert Image.open(out).size == (64 * 3, 64 * 2 + 14)      # reference | sample | *s overlay, 2 rows
    with pytest.raises(SystemExit, match=r"\*p"):
        generate.main(["--run", str(run), "--prompt", "a chair with pose *p", "--shape-from",
                       str(chairs_dir / "chair_011"), "--steps", "2"])


# ----------------------------------------------------------------------------------------------
# The mechanism: the mask loss pulls *s's attention into the object mask (held-out objects)
# ----------------------------------------------------------------------------------------------
def train_shape(backbone, records, mask_weight, steps=150, seed=0, encoder="set"):
    torch.manual_seed(seed)
    system = make_system(backbone, concepts={"shape": {"lr": 1e-2, "encoder": encoder}},
                         losses={"shape": {"mask_weight": mask_weight, "mask_variant": "mass_ratio"}})
    optimizer = torch.optim.AdamW([p for p in system.heads.parameters() if p.requires_grad], lr=1e-2)
    data = ObjectViewsDataset(records, 64, 0.5, mask_set_size=8, random_set_size=True)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    rng, step = random.Random(seed), 0
    while step < steps:
        for batch in loader:
            prompts = prompts_for(batch["category"], ["a photo of a {category} {phrases}"], system.clauses, ["shape"], rng)
            terms = training_losses(system, batch, prompts)
            optimizer.zero_grad()
            sum(w * v.mean() for w, v in terms.values()).backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    system.heads.eval()
    return system


@pytest.mark.parametrize("encoder", ["view", "set"])
@pytest.mark.slow
def test_mask_loss_moves_attention_into_the_mask(tiny_model_dir, chairs_dir, encoder):
    """Held-out objects, t=100: with the mask loss *s's attention lies clearly more inside the
    mask than in the same run with weight 0 (single-view head and set encoder alike)."""
    from guided_concepts.backbone import load_backbone
    records = scan_objects(chairs_dir)
    held_out = ObjectViewsDataset(records[-2:], 64, 0.0, mask_set_size=8)
    batch = collate([held_out[i] for i in range(len(held_out))])
    prompts = ["a photo of a chair in the shape of *s"] * len(held_out)
    found = {}
    for weight in (0.0, 1.0):
        system = train_shape(load_backbone(str(tiny_model_dir)), records[:-2], weight, encoder=encoder)
        m = attention_mask_metrics(system, batch, prompts, timestep=100)
        found[weight] = (m["shape/mass_inside"].mean().item(), m["shape/iou"].mean().item())
    area = batch["mask"].mean().item()
    print(f"{encoder}: held-out attention at t=100 (mass inside, IoU), mask area {area:.3f}: "
          f"weight 0 -> {found[0.0]}, weight 1 -> {found[1.0]}")
    assert abs(found[0.0][0] - area) < 0.06          # without the loss: about the mask's area share
    assert found[1.0][0] > found[0.0][0] + 0.08      # with it: clearly more of *s inside the mask
    assert found[1.0][1] > found[0.0][1] + 0.02


# ----------------------------------------------------------------------------------------------
# Regressions: resume guards, checkpointing, resolutions, v-prediction, mixed precision
# ----------------------------------------------------------------------------------------------
def test_resume_with_other_tokens_is_a_clear_error(trained_run):
    run, out = trained_run
    before = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit, match="resume with the same --tokens"):
        train.main(["--name", "r", "--set", f"run.output_dir={out}", "--tokens", "shape,pose", "--resume"])
    assert (run / "config.yaml").read_text() == before          # nothing written


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, chair_batch, monkeypatch):
    """Recomputation in backward re-runs the capture processors; each captured layer must still be
    recorded exactly once per forward (and the gradients must not change)."""
    from guided_concepts.backbone import load_backbone
    from guided_concepts.capture import AttentionStore
    grads, calls = [], []
    original_add = AttentionStore.add

    def counting_add(self, layer, probs, prompt_index):
        calls.append((layer, self.recording))
        return original_add(self, layer, probs, prompt_index)
    monkeypatch.setattr(AttentionStore, "add", counting_add)
    for checkpointing in (False, True):
        calls.clear()
        backbone = load_backbone(str(tiny_model_dir))
        torch.manual_seed(0)                       # same head initialisation both times
        system = make_system(backbone, tokens=("shape", "pose"))
        with torch.no_grad():
            for n in system.tokens:
                system.heads[n].head.mlp[-1].weight.normal_(std=1e-2, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            backbone.unet.enable_gradient_checkpointing()
            backbone.unet.train()
        prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, system.tokens, random.Random(0))
        terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0))
        recorded_in_forward = [layer for layer, recording in calls if recording]
        sum(w * v.mean() for w, v in terms.values()).backward()
        grads.append({k: p.grad.clone() for k, p in system.heads.named_parameters() if p.grad is not None})
        layers = system.attention_layers
        assert sorted(recorded_in_forward) == sorted(layers)                # once per captured layer
        assert [layer for layer, recording in calls if recording] == recorded_in_forward   # none in backward
        # With checkpointing, backward did re-run every captured layer (without recording).
        assert sorted(layer for layer, recording in calls if not recording) == (sorted(layers) if checkpointing else [])
        assert system.store.counts == {layer: 1 for layer in layers}
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5), key


def test_training_at_a_non_native_resolution(tmp_path):
    """32 px data on the 64 px tiny model: latents, attention layers and sample grids follow."""
    run = train.main(args(tmp_path, "r32", "--set", "data.resolution=32", "--set", "train.steps=2"))
    from PIL import Image
    grid = Image.open(run / "samples" / "step_000002.png")
    assert grid.size == (64 * 4, 64 * 2 + 14)       # reference | *s t=100 | sample | *s, 2 objects; 32 px tiles shown at 64


def test_v_prediction_model_trains_and_samples(tmp_path, tiny_model_dir):
    """An SD 2.x-style folder (v-prediction in its scheduler config) goes through the same path."""
    import shutil
    from guided_concepts.backbone import load_backbone
    folder = tmp_path / "tiny-v"
    shutil.copytree(tiny_model_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    assert load_backbone(str(folder)).prediction_type == "v_prediction"
    run = train.main(args(tmp_path, "v", "--model", str(folder), "--set", "train.steps=2"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["denoise"])) for r in records if "denoise" in r)
    assert (run / "samples" / "step_000002.png").is_file()


def test_bf16_run_through_accelerate(tmp_path):
    run = train.main(args(tmp_path, "bf16", "--set", "model.mixed_precision=bf16", "--set", "train.steps=2"))
    state = load_file(str(run / "checkpoints" / "step_000002" / "heads.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/shape/mass_inside@t100" in r for r in records)


def test_trained_word_changes_what_is_generated(trained_run, chairs_dir):
    """The same seed with the trained *s and with the initializer word gives different images."""
    run, _ = trained_run
    system, cfg = generate.load_run(run)
    _, trained, _ = generate.generate(system, cfg, "a photo of a chair in the shape of *s",
                                      {"shape": chairs_dir / "chair_011"}, num=1, steps=2)
    head = system.heads["shape"].head
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        head.rows.copy_(system.table.initializer_rows["shape"].expand_as(head.rows))
    _, fresh, _ = generate.generate(system, cfg, "a photo of a chair in the shape of *s",
                                    {"shape": chairs_dir / "chair_011"}, num=1, steps=2)
    assert not torch.allclose(trained, fresh, atol=1e-4)


def test_latent_cache_draws_the_same_latents_and_encodes_once(fresh_backbone, chair_batch, monkeypatch):
    system = make_system(fresh_backbone)
    plain = [encode_latents(system.backbone, chair_batch, torch.Generator().manual_seed(s)) for s in (0, 1)]
    cache = LatentCache()                                          # what the run owns with data.cache_latents
    encodes = []
    original = type(fresh_backbone.vae).encode
    monkeypatch.setattr(type(fresh_backbone.vae), "encode", lambda self, x, *a, **k: encodes.append(len(x)) or original(self, x, *a, **k))
    cached = [encode_latents(system.backbone, chair_batch, torch.Generator().manual_seed(s), cache) for s in (0, 1)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, cached))    # same samples as uncached
    assert not torch.allclose(cached[0], cached[1])                                # still sampled, not the mean
    assert encodes == [len(chair_batch["image"])]                                   # second call: all cached
    flipped = {**chair_batch, "flipped": ~chair_batch["flipped"], "image": chair_batch["image"].flip(-1)}
    encode_latents(system.backbone, flipped, torch.Generator().manual_seed(0), cache)
    assert encodes[-1] == len(chair_batch["image"])                                  # a flip is another entry


@pytest.mark.slow
def test_compiled_unet_trains_and_still_captures(tmp_path):
    """--compile: the capture bookkeeping is a graph break, so maps (and the mask loss) survive."""
    run = train.main(["--name", "c", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=2",
                      "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "sample.steps=1",
                      "--compile"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(0 < x["shape/mask_attention"] < 10 for x in lines)
    import yaml
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["compile"] is True


def test_sample_every_minus_one_skips_validation_even_at_the_end(tmp_path, tiny_model_dir, chairs_dir):
    run = train.main(["--name", "nv", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=2",
                      "--set", "train.sample_every=-1"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert not any(k.startswith("val/") for r in records for k in r)
    assert not any((run / "samples").glob("*.png"))                           # no validation grid
    assert (run / "tokens" / "chair_000" / "shape.safetensors").is_file()       # words still exported
    with pytest.raises(SystemExit, match="sample_every >= -1"):
        train.main(["--name", "nv2", "--set", f"run.output_dir={tmp_path}", "--set", "train.sample_every=-2"])
