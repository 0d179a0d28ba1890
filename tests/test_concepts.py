"""One table every concept joins: a new concept gets the shared checks by adding a row."""
from __future__ import annotations

import random

import pytest
import torch

from guided_concepts.backbone import load_backbone
from guided_concepts.concepts import CONCEPTS
from tests.conftest import make_system
from guided_concepts.prompts import prompts_for
from guided_concepts.objective import training_losses

# (concept, its config overrides, its loss config overrides)
ROWS = [
    ("shape", {}, {}),
    ("shape", {"num_vectors": 3}, {"mask_variant": "mass_ratio"}),
    ("shape", {"use_image": True}, {}),
    ("shape", {"encoder": "view"}, {"mask_variant": "mass_ratio"}),
    ("shape", {"encoder": "view", "use_image": True}, {"align_kind": "cosine"}),
    ("shape", {"fixed_norm": 0.9, "standardize": True, "logvar_init": -4.0}, {"identity_weight": 0.1, "contrast_weight": 1.0}),
    ("shape", {"encoder": "view", "standardize": True}, {}),
    ("shape", {"mask_pool": "mean_max", "standardize": True}, {}),
    ("shape", {"mask_input": "mask_shading", "standardize": True}, {}),
    ("shape", {"mask_resolution": 32}, {}),
    ("pose", {}, {}),
    ("pose", {"inputs": ["keypoints"], "num_keypoints": 10}, {}),
    ("pose", {"inputs": ["image", "camera"], "num_vectors": 2}, {}),
    ("pose", {"fixed_norm": 0.9, "norm_to_initializer": False}, {"contrast_weight": 1.0}),
    ("appearance", {}, {}),
    ("appearance", {"encoder": "pretrained"}, {}),
    ("appearance", {"encoder": "colour", "fixed_norm": 0.9}, {"contrast_weight": 1.0}),
    ("style", {}, {}),
]


def row_id(row):
    name, cfg, loss = row
    return "-".join([name] + [f"{k}={v}" for k, v in {**cfg, **loss}.items()])


@pytest.fixture(params=ROWS, ids=row_id)
def row_system(request, tiny_model_dir):
    name, cfg, loss = request.param
    config = CONCEPTS[name].config(**cfg)
    backbone = load_backbone(str(tiny_model_dir), need_image_encoder=CONCEPTS[name].concept.requirements(config).image_encoder)
    return name, make_system(backbone, tokens=[name], concepts={name: cfg}, losses={name: loss})


def test_registry_entries_are_complete():
    assert {row[0] for row in ROWS} == set(CONCEPTS), "every registered concept joins the table"
    for name, (cls, config_cls, loss_cls) in CONCEPTS.items():
        assert cls.name == name
        assert config_cls().token.startswith("*"), "placeholder words are written *x by convention"
        assert isinstance(cls.requirements(config_cls()).data, tuple)


def test_fresh_word_is_its_initializer(row_system, chair_batch):
    name, system = row_system
    system.heads.eval()
    with torch.no_grad():
        out = system.heads[name].encode(chair_batch)
    k = system.heads[name].config.num_vectors
    b = len(chair_batch["category"])
    assert out.embeds.shape == (b, k, system.table.embedding_dim) == out.offset.shape
    rows = system.table.initializer_rows[name].expand(b, k, -1)
    fixed = system.heads[name].config.fixed_norm
    if fixed:       # the initializer's direction at the fixed norm
        rows = rows * fixed / rows.norm(dim=-1, keepdim=True)
    assert torch.allclose(out.embeds, rows, atol=1e-6) and not out.offset.any()


def test_every_loss_is_per_sample_and_finite(row_system, chair_batch):
    name, system = row_system
    prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, [name], random.Random(0))
    terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(1))
    b = len(chair_batch["category"])
    assert "denoise" in terms and any(k.startswith(f"{name}/") for k in terms)
    for key, (weight, value) in terms.items():
        assert value.shape == (b,), key
        assert torch.isfinite(value).all(), key
        assert weight >= 0, key


def test_gradient_reaches_every_trainable_parameter(row_system, chair_batch):
    name, system = row_system
    with torch.no_grad():   # move off the zero init so every layer's gradient can be non-zero
        system.heads[name].head.mlp[-1].weight.normal_(std=1e-2)
    prompts = prompts_for(chair_batch["category"], ["a photo of a {category} {phrases}"], system.clauses, [name], random.Random(0))
    terms = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(1))
    sum(w * v.mean() for w, v in terms.values()).backward()
    for pname, p in system.heads[name].named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_save_load_round_trip(row_system, chair_batch, tiny_model_dir):
    """A trained head saved with trainable_state and loaded into a fresh system gives the same word."""
    name, system = row_system
    with torch.no_grad():
        for p in system.heads[name].parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
    system.heads.eval()
    state = system.trainable_state()
    assert state and all(k.startswith(f"{name}.") for k in state)
    config, loss_config = system.heads[name].config, system.heads[name].loss_config
    backbone = load_backbone(str(tiny_model_dir), need_image_encoder=CONCEPTS[name].concept.requirements(config).image_encoder)
    again = make_system(backbone, tokens=[name], concepts={name: vars(config)}, losses={name: vars(loss_config)})
    again.load_trainable_state(state)
    again.heads.eval()
    with torch.no_grad():
        before, after = system.heads[name].encode(chair_batch).embeds, again.heads[name].encode(chair_batch).embeds
    assert not torch.allclose(after, system.table.initializer_rows[name].expand_as(after))    # not a fresh head
    assert torch.allclose(before, after, atol=1e-6)


def test_gradients_reach_only_this_concepts_head(row_system, chair_batch, tiny_model_dir):
    """Beside every other registered concept, this word's encoding trains its own head only."""
    name, row = row_system
    config = row.heads[name].config
    others = [n for n in CONCEPTS if n != name and not CONCEPTS[n].concept.requirements(CONCEPTS[n].config()).image_encoder]
    backbone = load_backbone(str(tiny_model_dir), need_image_encoder=CONCEPTS[name].concept.requirements(config).image_encoder)
    system = make_system(backbone, tokens=[name, *others], concepts={name: vars(config)})
    system.heads[name].encode(chair_batch).embeds.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in system.heads[name].parameters())
    for other in others:
        assert all(p.grad is None for p in system.heads[other].parameters()), other


def test_encoding_depends_on_the_input_and_is_deterministic(row_system, chair_batch):
    """At evaluation (and at diversity 0 for stochastic heads) a word is a function of its input."""
    name, system = row_system
    system.heads.eval()
    with torch.no_grad():
        system.heads[name].head.mlp[-1].weight.normal_(std=1e-2)
        a = system.heads[name].encode(chair_batch).embeds
        b = system.heads[name].encode(chair_batch).embeds
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])       # different objects, different words


def test_fixed_norm_word_cannot_grow():
    """With fixed_norm only the direction is learned: any head output gives a word of that norm."""
    from guided_concepts.concepts.base import OffsetHead
    head = OffsetHead(8, torch.randn(16) * 0.1, num_vectors=2, hidden_dim=32, scale=1.0, train_rows=True, fixed_norm=0.9)
    with torch.no_grad():
        head.mlp[-1].weight.normal_(std=10.0)
        head.rows.mul_(100)
    out = head(torch.randn(5, 8))
    assert out.embeds.shape == (5, 2, 16)
    assert torch.allclose(out.embeds.norm(dim=-1), torch.full((5, 2), 0.9), atol=1e-5)


def test_colour_statistics_see_colour_but_not_the_outline():
    from guided_concepts.concepts.appearance import ColourStatistics
    image = torch.zeros(2, 3, 16, 16)
    image[:, 0] = 0.8                                   # red object everywhere it is visible
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:6, 2:14] = 1                          # a wide outline
    mask[1, :, 4:14, 6:10] = 1                         # a tall one
    stats = ColourStatistics()(image, mask)
    assert stats.shape == (2, ColourStatistics.out_dim)
    assert torch.allclose(stats[0], stats[1])          # same colour, different silhouette: same input
    blue = image.clone()
    blue[:, 0], blue[:, 2] = 0.0, 0.8
    assert not torch.allclose(ColourStatistics()(blue, mask)[0], stats[0])


def test_standardised_shape_code_keeps_objects_apart():
    """The set encoder's code is standardised across the batch: objects whose masks differ only a
    little still get codes of unit spread, so the head cannot read them as one constant."""
    from guided_concepts.concepts.shape import MaskSetEncoder
    torch.manual_seed(0)
    encoder = MaskSetEncoder(width=8, code_dim=6, use_cameras=False, logvar_init=-4.0, standardize=True)
    masks = torch.zeros(4, 2, 1, 32, 32)
    for i in range(4):
        masks[i, :, :, 8:24, 8:24 + i] = 1              # squares one pixel wider each
    mu, logvar = encoder(masks, torch.ones(4, 2, dtype=torch.bool))
    assert torch.allclose(mu.std(0, unbiased=False), torch.ones(6), atol=1e-2)
    assert torch.allclose(logvar.mean(), torch.tensor(-4.0), atol=1.0)      # starts narrow


def test_max_pooled_mask_features_see_a_small_part_the_mean_hardly_sees():
    """An 'arm' of a few pixels: its share of the mean-pooled features is its share of the area,
    while the max-pooled half moves as much as for a large part."""
    from guided_concepts.concepts.base import ConvEncoder
    torch.manual_seed(0)
    encoder = ConvEncoder(width=8, pool="mean_max")
    seat = torch.zeros(1, 1, 32, 32)
    seat[..., 12:20, 8:24] = 1
    with_arm = seat.clone()
    with_arm[..., 8:12, 8:9] = 1                                           # a 1x4 pixel arm
    a, b = encoder(seat), encoder(with_arm)
    half = a.shape[-1] // 2
    mean_change = (a[:, :half] - b[:, :half]).abs().max()
    max_change = (a[:, half:] - b[:, half:]).abs().max()
    assert a.shape == (1, 2 * 32) and max_change > 2 * mean_change


def test_set_shading_keeps_the_parts_and_drops_the_colour(chairs_dir):
    """The shading channel of the mask set: zero outside the mask, standardised inside, flipped
    with the item, and the same for a darker (or differently coloured, flat-shaded) object."""
    from guided_concepts.objectdata import ObjectViewsDataset, scan_objects
    from guided_concepts.objectdata.dataset import ObjectViewsDataset as Dataset
    records = scan_objects(chairs_dir)[:1]
    plain = ObjectViewsDataset(records, 32, flip_prob=0.0, mask_set_size=3, set_shading=True)[0]
    shading, masks, valid = plain["mask_set_shading"], plain["mask_set"], plain["mask_set_valid"]
    assert shading.shape == masks.shape and valid.any()
    assert (shading[masks == 0] == 0).all()
    for s, m, ok in zip(shading, masks, valid):
        if ok:
            inside = s[m > 0]
            assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 0.05
    image = torch.rand(3, 32, 32)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    assert torch.allclose(Dataset._set_shading(image, mask), Dataset._set_shading(image * 0.5, mask), atol=0.05)   # unit spread
    flipped = ObjectViewsDataset(records, 32, flip_prob=1.0, mask_set_size=3, set_shading=True)[0]
    assert torch.allclose(flipped["mask_set_shading"], shading.flip(-1))
    assert "mask_set_shading" not in ObjectViewsDataset(records, 32, mask_set_size=3)[0]     # only when asked


def test_mask_set_reads_parts_the_training_views_lose(tmp_path):
    """Mask files larger than data.resolution: the views train at 32 px, where a 2-pixel armrest
    of a 128 px file falls under the threshold, while the mask set is read from the file at
    concepts.shape.mask_resolution and keeps it; the option reaches the data through the config."""
    import json

    import numpy as np
    from PIL import Image

    from guided_concepts.configs.schema import load_config, mask_set_options
    from guided_concepts.objectdata import ObjectViewsDataset, scan_objects
    folder = tmp_path / "objects" / "chair_000"
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    mask = np.zeros((128, 128), np.uint8)
    mask[64:96, 32:96] = 255                 # seat
    mask[40:64, 34:36] = 255                 # armrest: 2 px wide, 24 px tall
    Image.fromarray(np.stack([mask] * 3, -1)).save(folder / "views" / "000.png")
    Image.fromarray(mask).save(folder / "masks" / "000.png")
    (folder / "meta.json").write_text(json.dumps({"category": "chair"}))
    records = scan_objects(tmp_path / "objects")
    arm = lambda m, scale: m[..., 40 * scale // 128:64 * scale // 128, :40 * scale // 128].sum().item()   # noqa: E731
    view = ObjectViewsDataset(records, 32, flip_prob=0.0, mask_set_size=1, mask_set_resolution=64)[0]
    assert arm(view["mask"], 32) == 0                                  # gone at the training size
    assert arm(view["mask_set"][0], 64) >= 12                           # a column of the arm at 64 px
    cfg = load_config(None, ["concepts.shape.mask_resolution=128"], tokens=["shape"])
    options = mask_set_options(cfg)
    assert options["mask_set_resolution"] == 128 and options["mask_set_size"] == cfg.concepts["shape"].max_views
    item = ObjectViewsDataset(records, 32, flip_prob=0.0, **options)[0]
    assert item["mask_set"].shape[-1] == 128 and arm(item["mask_set"][0], 128) == 24 * 2
    assert mask_set_options(load_config(None, tokens=["pose"]))["mask_set_size"] == 0     # no set reader: no set
