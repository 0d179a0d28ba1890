"""Several words trained jointly: every word learns, union sampling, templates, mixing sources."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from guided_concepts import generate
from guided_concepts.concepts.pose import camera_batch
from guided_concepts import train
from guided_concepts.concepts import CONCEPTS
from guided_concepts.prompts import random_subsets, render_prompt
from tests.conftest import make_system
from guided_concepts.tokens import TokenError
from guided_concepts.prompts import make_prompts, prompts_for
from guided_concepts.objective import training_losses
from guided_concepts import sampling

ALL = list(CONCEPTS)


@pytest.mark.parametrize("tokens", [("shape", "pose"), ("shape", "pose", "appearance"), tuple(ALL)],
                         ids=lambda t: "+".join(t))
def test_every_active_word_gets_a_gradient_in_a_joint_step(fresh_backbone, chair_batch, tokens):
    system = make_system(fresh_backbone, tokens=tokens)
    prompts, present = make_prompts(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, random.Random(0))
    assert all(present[n].all() for n in tokens)
    for n in tokens:
        assert system.heads[n].config.token in prompts[0]
    terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0), present=present)
    # The shared denoising loss alone must reach every word (through the prompt, not a side loss).
    terms["denoise"][1].mean().backward()
    for n in tokens:
        head = system.heads[n].head
        assert head.rows.grad is not None and head.rows.grad.abs().sum() > 0, n
        assert head.mlp[-1].weight.grad.abs().sum() > 0, n


def test_union_sampling_draws_every_non_empty_subset():
    subsets = random_subsets(ALL, 2000, random.Random(0))
    seen = {tuple(s) for s in subsets}
    expected = {tuple(c) for r in range(1, len(ALL) + 1) for c in itertools.combinations(ALL, r)}
    assert seen == expected and all(subsets)
    counts = [sum(tuple(s) == e for s in subsets) for e in expected]
    assert min(counts) > 2000 / len(expected) / 2             # roughly uniform


def test_union_sampling_masks_the_absent_words_losses(fresh_backbone, chair_batch):
    system = make_system(fresh_backbone, tokens=("shape", "pose"))
    prompts, present = make_prompts(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, random.Random(0), union=True)
    for prompt, has_shape, has_pose in zip(prompts, present["shape"], present["pose"]):
        assert ("*s" in prompt) == bool(has_shape) and ("*p" in prompt) == bool(has_pose)
    terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0), present=present)
    absent = ~present["shape"]
    assert absent.any()
    assert (terms["shape/mask_attention"][1][absent] == 0).all()
    absent_pose = ~present["pose"]
    assert absent_pose.any()
    for key in ("pose/probe", "pose/keypoint_attention", "pose/offset_l2"):
        assert (terms[key][1][absent_pose] == 0).all(), key


@pytest.mark.parametrize("subset", [list(c) for r in range(0, len(ALL) + 1) for c in itertools.combinations(ALL, r)],
                         ids=lambda s: "+".join(s) or "none")
def test_templates_render_for_every_subset(subset):
    clauses = {n: entry.config().phrase.format(token=entry.config().token, category="{category}")
               for n, entry in CONCEPTS.items()}
    active = {n: clauses[n] for n in subset}
    written = {n: c.replace("{category}", "chair") for n, c in clauses.items()}   # a noun clause wraps "chair"
    slots = [f"{{{n}}}" for n in ALL]                    # "{shape} {pose}, {appearance}, {style}, ..."
    named = render_prompt("a photo of a {category} " + " ".join(slots[:2]) + "".join(", " + s for s in slots[2:]),
                          "chair", active)
    free = render_prompt("a photo of a {category} {phrases}", "chair", active)
    for text in (named, free):
        assert text.startswith("a photo of a ") and "chair" in text and "{" not in text
        assert "  " not in text and " ," not in text and ",," not in text and not text.endswith(",")
        for n in ALL:
            assert (written[n] in text) == (n in subset), (n, text)
    if subset == ["shape", "pose", "appearance", "style"]:
        assert named == "a photo of a *a chair in the shape of *s with pose *p, in the style of *t"
    with pytest.raises(ValueError, match="unknown slot"):
        render_prompt("a {colour} {category}", "chair", active)


def test_ablating_one_words_loss_changes_only_that_word(tiny_model_dir, chair_batch):
    """With the pose probe off, the pose head's gradient changes and the shape head's does not."""
    from guided_concepts.backbone import load_backbone
    grads = []
    for probe_weight in (0.1, 0.0):
        torch.manual_seed(0)
        system = make_system(load_backbone(str(tiny_model_dir)), tokens=("shape", "pose"),
                             losses={"pose": {"probe_weight": probe_weight}})
        prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, system.tokens, random.Random(0))
        terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0))
        sum(w * v.mean() for w, v in terms.values()).backward()
        grads.append({k: p.grad.clone() for k, p in system.heads.named_parameters() if p.grad is not None})
    for key in grads[0]:
        same = torch.allclose(grads[0][key], grads[1][key], atol=1e-7)
        if key.startswith("shape."):
            assert same, key
    assert not all(torch.allclose(grads[0][k], grads[1][k]) for k in grads[0] if k.startswith("pose."))


def test_swapping_one_words_source_changes_only_that_word(fresh_backbone, chairs_dir):
    """Shape from A or from B, pose from the same camera: *p is identical, *s differs."""
    system = make_system(fresh_backbone, tokens=("shape", "pose"))
    with torch.no_grad():
        for n in system.tokens:
            system.heads[n].head.mlp[-1].weight.normal_(std=1e-2)
    words = []
    for source in ("chair_000", "chair_005"):
        batch = generate.reference_batch(chairs_dir / source, 0, 64, ("mask",))
        camera = camera_batch({"azimuth": 30.0, "elevation": 10.0, "distance": None}, [2.5, 2.5])
        with torch.no_grad():
            words.append({"shape": system.heads["shape"].encode(batch).embeds,
                          "pose": system.heads["pose"].encode(camera).embeds})
    assert torch.equal(words[0]["pose"], words[1]["pose"])
    assert not torch.allclose(words[0]["shape"], words[1]["shape"])


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_model_dir, chairs_dir):
    out = tmp_path_factory.mktemp("joint")
    run = train.main(["--name", "j", "--set", f"run.output_dir={out}", "--tokens", ",".join(ALL),
                      "--set", "train.steps=3", "--set", "train.sample_every=0", "--set", "sample.steps=2"])
    return run


def test_all_four_words_train_and_log(joint_run):
    import json
    records = [json.loads(line) for line in (joint_run / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*[r for r in records if "loss" in r])
    for key in ("shape/mask_attention", "shape/view_consistency", "pose/probe", "pose/keypoint_attention",
                "pose/camera_consistency", "appearance/masked_denoise", "style/offset_l2"):
        assert key in train_keys, key
    val = [r for r in records if "val/pose/azimuth_error_deg" in r]
    assert val and val[-1]["val/pose/azimuth_error_deg"] >= 0
    assert val[-1]["val/shape/mass_inside@t100"] > 0
    for n in ALL:
        assert (joint_run / "tokens" / "chair_000" / f"{n}.safetensors").is_file()


def test_generation_mixes_sources(joint_run, chairs_dir, tmp_path):
    system, cfg = generate.load_run(joint_run)
    prompt = "a photo of a *a chair in the shape of *s with pose *p, in the style of *t"
    sources = {"shape": chairs_dir / "chair_001", "pose": {"azimuth": 30.0, "elevation": 10.0, "distance": None},
               "appearance": chairs_dir / "chair_004", "style": chairs_dir / "chair_007"}
    reference, images, maps = generate.generate(system, cfg, prompt, sources, num=1, steps=2)
    assert images.shape == (1, 3, 64, 64) and maps.shape[1] == 2           # *s and *p read attention
    other = dict(sources, pose={"azimuth": -120.0, "elevation": 30.0, "distance": None})
    _, images_b, _ = generate.generate(system, cfg, prompt, other, num=1, steps=2)
    assert not torch.allclose(images, images_b)                             # pose source matters
    with pytest.raises(ValueError, match="--pose-from"):
        generate.generate(system, cfg, prompt, {"shape": chairs_dir / "chair_001"}, num=1, steps=2)
    out = generate.main(["--run", str(joint_run), "--prompt", "a chair in the shape of *s with pose *p",
                         "--shape-from", str(chairs_dir / "chair_002"), "--pose", "azimuth=45,elevation=20",
                         "--num", "1", "--steps", "2", "--out", str(tmp_path / "mix.png")])
    assert out.is_file()
    with pytest.raises(SystemExit, match="azimuth=A"):
        generate.main(["--run", str(joint_run), "--prompt", "*p", "--pose", "yaw=3", "--steps", "1"])


def test_prompt_with_an_untrained_word_and_unknown_tokens_are_clear_errors(joint_run, tmp_path):
    system, cfg = generate.load_run(joint_run)
    with pytest.raises(TokenError, match=r"'\*q', which this run did not train"):
        generate.generate(system, cfg, "a chair like *q", {}, num=1, steps=1)
    with pytest.raises(SystemExit, match=f"unknown concept 'colour'; valid: {', '.join(CONCEPTS)}"):
        train.main(["--name", "x", "--set", f"run.output_dir={tmp_path}", "--tokens", "shape,colour"])


def test_templates_per_category(fresh_backbone):
    system = make_system(fresh_backbone, tokens=("shape", "pose"))
    batch = {"category": ["chair", "dog", "chair"]}
    prompts, _ = make_prompts(batch["category"], ["a photo of a {category} {phrases}"], system.clauses, random.Random(0),
                                     by_category={"dog": ["a {category} {shape}, {pose}"]})
    assert prompts[1] == "a dog in the shape of *s, with pose *p"
    assert prompts[0] == prompts[2] == "a photo of a chair in the shape of *s with pose *p"


def test_explicit_pose_on_a_keypoint_head_is_a_clear_error(tmp_path, chairs_dir):
    run = train.main(["--name", "kp", "--set", f"run.output_dir={tmp_path}", "--tokens", "shape,pose",
                      "--set", "concepts.pose.inputs=[keypoints]", "--set", "train.steps=1",
                      "--set", "train.sample_every=0", "--set", "sample.steps=1"])
    with pytest.raises(SystemExit, match="use --pose-from"):
        generate.main(["--run", str(run), "--prompt", "a chair with pose *p", "--pose", "azimuth=30,elevation=10",
                       "--steps", "1", "--num", "1"])
    out = generate.main(["--run", str(run), "--prompt", "a chair with pose *p", "--pose-from",
                         str(chairs_dir / "chair_003"), "--steps", "1", "--num", "1", "--out", str(tmp_path / "kp.png")])
    assert out.is_file()


def test_pose_head_takes_objects_with_another_keypoint_count(fresh_backbone, chair_batch):
    """A keypoint pose head trained on 10 points encodes objects listing 6 or 14."""
    system = make_system(fresh_backbone, tokens=("pose",), concepts={"pose": {"inputs": ["keypoints"], "num_keypoints": 10}})
    concept = system.heads["pose"].eval()
    for k in (6, 14):
        keypoints = torch.rand(4, k, 2)
        batch = dict(chair_batch, keypoints=keypoints, keypoint_valid=torch.ones(4, k, dtype=torch.bool))
        with torch.no_grad():
            assert torch.isfinite(concept.encode(batch).embeds).all()


def test_a_words_strength_moves_it_from_its_initializer_word(joint_run, chairs_dir):
    system, cfg = generate.load_run(joint_run)
    prompt = "a photo of a chair in the shape of *s"
    sources = {"shape": chairs_dir / "chair_001"}

    def sample(strengths=None, text=prompt, given=sources):
        return generate.generate(system, cfg, text, given, num=1, steps=2, strengths=strengths)[1]

    learned = sample()
    assert torch.equal(sample({"shape": 1.0}), learned)
    assert not torch.allclose(sample({"shape": 3.0}), learned)
    # Strength 0 is the initializer word itself: the same image as the prompt that writes it.
    word = cfg.concepts["shape"].initializer
    assert torch.allclose(sample({"shape": 0.0}), sample(None, prompt.replace("*s", word), {}), atol=1e-5)
    encoded = system.encode(generate.concept_reference_batch(chairs_dir / "chair_001", 0, cfg, "shape"), ["shape"])
    init = system.table.initializer_rows["shape"].reshape(1, 1, -1)
    doubled = sampling.with_strength(system, encoded, {"shape": 2.0})["shape"].embeds
    assert torch.allclose(doubled - init, 2 * (encoded["shape"].embeds - init), atol=1e-6)
    with pytest.raises(ValueError, match=r"--strength pose=\.\.\.: the prompt does not use that word"):
        sample({"pose": 2.0})
    with pytest.raises(SystemExit):
        generate.main(["--run", str(joint_run), "--prompt", prompt, "--strength", "shape"])
