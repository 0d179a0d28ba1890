"""One table every concept joins: a new concept gets the shared checks by adding a row."""
from __future__ import annotations

import random

import pytest
import torch

from backbone import load_backbone
from concepts import CONCEPTS
from tests.conftest import make_system

# (concept, its config overrides, its loss config overrides)
ROWS = [
    ("shape", {}, {}),
    ("shape", {"num_vectors": 3}, {"mask_variant": "mass_ratio"}),
    ("shape", {"use_image": True}, {}),
    ("shape", {"encoder": "view"}, {"mask_variant": "mass_ratio"}),
    ("shape", {"encoder": "view", "use_image": True}, {"align_kind": "cosine"}),
    ("pose", {}, {}),
    ("pose", {"inputs": ["keypoints"], "num_keypoints": 10}, {}),
    ("pose", {"inputs": ["image", "camera"], "num_vectors": 2}, {}),
    ("appearance", {}, {}),
    ("appearance", {"encoder": "pretrained"}, {}),
    ("style", {}, {}),
]


def row_id(row):
    name, cfg, loss = row
    return "-".join([name] + [f"{k}={v}" for k, v in {**cfg, **loss}.items()])


@pytest.fixture(params=ROWS, ids=row_id)
def row_system(request, tiny_model_dir):
    name, cfg, loss = request.param
    config = CONCEPTS[name][1](**cfg)
    backbone = load_backbone(str(tiny_model_dir), need_image_encoder=CONCEPTS[name][0].uses_image_encoder(config))
    return name, make_system(backbone, tokens=[name], concepts={name: cfg}, losses={name: loss})


def test_registry_entries_are_complete():
    for name, (cls, config_cls, loss_cls) in CONCEPTS.items():
        assert cls.name == name
        assert config_cls().token.startswith("*"), "placeholder words are written *x by convention"
        assert isinstance(cls.needs, tuple)


def test_fresh_word_is_its_initializer(row_system, chair_batch):
    name, system = row_system
    system.concepts.eval()
    with torch.no_grad():
        out = system.concepts[name].encode(chair_batch)
    k = system.concepts[name].config.num_vectors
    b = len(chair_batch["category"])
    assert out.embeds.shape == (b, k, system.table.embedding_dim) == out.offset.shape
    rows = system.table.initializer_rows[name].expand(b, k, -1)
    assert torch.allclose(out.embeds, rows, atol=1e-6) and not out.offset.any()


def test_every_loss_is_per_sample_and_finite(row_system, chair_batch):
    name, system = row_system
    prompts = system.prompts_for(chair_batch, ["a photo of a {category} {phrases}"], [name], random.Random(0))
    terms = system.training_losses(chair_batch, prompts, torch.Generator().manual_seed(1))
    b = len(chair_batch["category"])
    assert "denoise" in terms and any(k.startswith(f"{name}/") for k in terms)
    for key, (weight, value) in terms.items():
        assert value.shape == (b,), key
        assert torch.isfinite(value).all(), key
        assert weight >= 0, key


def test_gradient_reaches_every_trainable_parameter(row_system, chair_batch):
    name, system = row_system
    with torch.no_grad():   # move off the zero init so every layer's gradient can be non-zero
        system.concepts[name].head.mlp[-1].weight.normal_(std=1e-2)
    prompts = system.prompts_for(chair_batch, ["a photo of a {category} {phrases}"], [name], random.Random(0))
    terms = system.training_losses(chair_batch, prompts, torch.Generator().manual_seed(1))
    sum(w * v.mean() for w, v in terms.values()).backward()
    for pname, p in system.concepts[name].named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_encoding_depends_on_the_input_and_is_deterministic(row_system, chair_batch):
    """At evaluation (and at diversity 0 for stochastic heads) a word is a function of its input."""
    name, system = row_system
    system.concepts.eval()
    with torch.no_grad():
        system.concepts[name].head.mlp[-1].weight.normal_(std=1e-2)
        a = system.concepts[name].encode(chair_batch).embeds
        b = system.concepts[name].encode(chair_batch).embeds
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])       # different objects, different words
