"""Shape from a set of masks: order invariance, any number of views, the diversity knob, the KL
and alignment terms, and which attention map the mask loss reads."""
from __future__ import annotations

import random

import pytest
import torch

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.backbone import load_backbone
from guided_concepts.concepts.base import StepView
from guided_concepts.losses import mask_attention_loss
from tests.conftest import make_system
from guided_concepts.prompts import prompts_for
from guided_concepts.objective import training_losses


@pytest.fixture
def shape_system(tiny_model_dir):
    torch.manual_seed(0)
    system = make_system(load_backbone(str(tiny_model_dir), need_image_encoder=True),
                         concepts={"shape": {"use_image": True}})
    with torch.no_grad():
        system.heads["shape"].head.mlp[-1].weight.normal_(std=1e-2)
    return system


def shuffled(batch, order):
    return dict(batch, mask_set=batch["mask_set"][:, order], mask_set_valid=batch["mask_set_valid"][:, order],
                mask_set_camera=batch["mask_set_camera"][:, order])


def test_set_encoding_ignores_the_order_of_views(shape_system, chair_batch):
    concept = shape_system.heads["shape"].eval()
    with torch.no_grad():
        a = concept.encode(chair_batch)
        b = concept.encode(shuffled(chair_batch, torch.randperm(chair_batch["mask_set"].shape[1])))
    assert torch.allclose(a.embeds, b.embeds, atol=1e-5)
    assert torch.allclose(a.extras["mu"], b.extras["mu"], atol=1e-5)


def test_single_view_sets_and_missing_sets_work(shape_system, chair_batch):
    concept = shape_system.heads["shape"].eval()
    one = dict(chair_batch, mask_set_valid=torch.zeros_like(chair_batch["mask_set_valid"]))
    one["mask_set_valid"][:, 0] = True                       # V = 1
    without = {k: v for k, v in chair_batch.items() if not k.startswith("mask_set")}
    with torch.no_grad():
        full, single, bare = concept.encode(chair_batch), concept.encode(one), concept.encode(without)
    for out in (single, bare):
        assert torch.isfinite(out.embeds).all() and out.embeds.shape == full.embeds.shape
    assert not torch.allclose(full.embeds, single.embeds)    # more views, another code


def test_diversity_zero_is_deterministic_and_spread_grows_with_tau(shape_system, chair_batch):
    concept = shape_system.heads["shape"].eval()
    spreads = []
    for tau in (0.0, 0.5, 1.0, 2.0):
        concept.diversity = tau
        draws = []
        for seed in range(8):
            concept.noise_generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                draws.append(concept.encode(chair_batch).embeds)
        draws = torch.stack(draws)                              # [8, B, K, D]
        spreads.append(draws.var(0).mean().item())
        if tau == 0:
            assert all(torch.equal(draws[0], d) for d in draws)
    assert spreads[0] == 0 and spreads[1] < spreads[2] < spreads[3]


def test_kl_and_alignment_are_finite_and_get_gradients(shape_system, chair_batch):
    concept = shape_system.heads["shape"].train()
    prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], shape_system.clauses, ["shape"], random.Random(0))
    terms = training_losses(shape_system, chair_batch, prompts, torch.Generator().manual_seed(0))
    for name in ("shape/kl", "shape/align"):
        weight, value = terms[name]
        assert weight > 0 and torch.isfinite(value).all() and value.shape == (4,)
    concept.zero_grad()
    terms["shape/kl"][1].mean().backward(retain_graph=True)
    assert concept.set_encoder.to_stats.weight.grad.abs().sum() > 0
    concept.zero_grad()
    terms["shape/align"][1].mean().backward()
    assert concept.set_encoder.to_stats.weight.grad.abs().sum() > 0       # mask branch
    assert concept.image_to_code[0].weight.grad.abs().sum() > 0           # image branch
    assert all(p.grad is None for p in concept.image_encoder.parameters())  # frozen encoder


@pytest.mark.parametrize("target", ["shape", "shape_pose_union"])
def test_mask_loss_reads_shape_or_the_shape_pose_union(fresh_backbone, tiny_model_dir, chair_batch, target):
    system = make_system(fresh_backbone, tokens=("shape", "pose"),
                         losses={"shape": {"attention_target": target, "mask_variant": "mass_ratio", "mask_t_range": [0, 1000]}})
    shape_map, pose_map = torch.rand(4, 16, 16), torch.rand(4, 16, 16)
    view = StepView(timesteps=torch.zeros(4, dtype=torch.long), attention={"shape": shape_map, "pose": pose_map},
                    pred=torch.zeros(4, 4, 16, 16), target=torch.zeros(4, 4, 16, 16))
    out = system.heads["shape"].encode(chair_batch)
    _, got = system.heads["shape"].guidance_losses(out, chair_batch, view)["mask_attention"]
    expected_map = shape_map + pose_map if target == "shape_pose_union" else shape_map
    assert torch.allclose(got, mask_attention_loss(expected_map, chair_batch["mask"], "mass_ratio"))
    if target == "shape_pose_union":
        with pytest.raises(ValueError, match="needs the pose token"):
            make_system(load_backbone(str(tiny_model_dir)), tokens=("shape",), losses={"shape": {"attention_target": target}})


def test_generation_from_masks_or_from_one_image(tmp_path, chairs_dir):
    run = train.main(["--name", "img", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=2",
                      "--set", "train.sample_every=0", "--set", "sample.steps=1", "--set", "concepts.shape.use_image=true"])
    system, cfg = generate.load_run(run)
    obj = chairs_dir / "chair_011"
    prompt = "a photo of a chair in the shape of *s"
    _, from_masks, _ = generate.generate(system, cfg, prompt, {"shape": obj}, num=1, steps=2)
    _, from_image, _ = generate.generate(system, cfg, prompt, {"shape": obj}, num=1, steps=2,
                                          options={"shape_source": "image"})
    _, varied, _ = generate.generate(system, cfg, prompt, {"shape": obj}, num=2, steps=2, diversity=1.0)
    assert from_masks.shape == from_image.shape == (1, 3, 64, 64) and varied.shape[0] == 2
    assert not torch.allclose(from_masks, from_image)
    records = [__import__("json").loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/shape/mask_image_cosine" in r for r in records)


def test_view_consistency_reads_the_code_mean_not_the_sampled_code(shape_system, chair_batch):
    """Two samples of one object with the same masks: zero consistency loss although each draws
    its own noise (pulling samples together would collapse the code)."""
    concept = shape_system.heads["shape"].train()
    batch = {k: (v[[0, 0]] if torch.is_tensor(v) else [v[0], v[0]]) for k, v in chair_batch.items()}
    out = concept.encode(batch)
    assert not torch.allclose(out.extras["code"][0], out.extras["code"][1])       # sampled codes differ
    view = StepView(timesteps=torch.zeros(2, dtype=torch.long), attention=None, pred=torch.zeros(2, 4, 8, 8),
                    target=torch.zeros(2, 4, 8, 8), same_object=torch.tensor([[False, True], [True, False]]))
    _, value = concept.guidance_losses(out, batch, view)["view_consistency"]
    assert torch.allclose(value, torch.zeros(2), atol=1e-10)


def test_encoder_none_is_plain_textual_inversion(tiny_model_dir, chair_batch):
    """encoder none: one learned word for every object, reading no masks (what a plain textual
    inversion step costs, bench/peer_step_cost.py); the rows are all it trains."""
    from guided_concepts.concepts import CONCEPTS
    from guided_concepts.configs.schema import load_config, mask_set_options
    cfg = load_config(None, ["concepts.shape.encoder=none", "losses.shape.mask_weight=0"])
    assert CONCEPTS["shape"].concept.requirements(cfg.concepts["shape"]).data == () and mask_set_options(cfg)["mask_set_size"] == 0
    system = make_system(load_backbone(str(tiny_model_dir)), concepts={"shape": {"encoder": "none"}},
                         losses={"shape": {"mask_weight": 0.0}})
    concept = system.heads["shape"]
    assert [n for n, p in concept.named_parameters() if p.requires_grad] == ["head.rows"]
    batch = {k: v for k, v in chair_batch.items() if k not in ("mask", "mask_set", "mask_set_valid")}
    out = concept.encode(batch)
    assert torch.equal(out.embeds, system.table.initializer_rows["shape"].expand_as(out.embeds))   # starts at its word
    prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, ["shape"], random.Random(0))
    terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(1))
    sum(w * v.mean() for w, v in terms.values()).backward()
    assert concept.head.rows.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads no masks"):
        make_system(load_backbone(str(tiny_model_dir)), concepts={"shape": {"encoder": "none"}},
                    losses={"shape": {"mask_weight": 0.1}})
    from guided_concepts.configs.schema import ConfigError
    with pytest.raises(ConfigError, match="reads no masks"):                   # caught when the config is built
        load_config(None, ["concepts.shape.encoder=none", "losses.shape.mask_weight=0.1"])
