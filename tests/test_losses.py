"""Losses are pure functions returning one value per sample."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from guided_concepts.losses import (attention_iou, attention_mass_inside, contrast_loss, denoising_loss,
                                     denoising_target, identity_loss, mask_attention_loss, offset_l2, word_target_loss)


def square_mask(b=3, size=32, lo=8, hi=24):
    m = torch.zeros(b, 1, size, size)
    m[:, :, lo:hi, lo:hi] = 1
    return m


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoising_target_follows_the_scheduler_config(kind):
    scheduler = DDPMScheduler(prediction_type=kind)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = denoising_target(scheduler, latents, noise, t)
    expected = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert torch.equal(target, expected)
    if kind == "v_prediction":
        assert not torch.allclose(target, noise)
    with pytest.raises(ValueError, match="sample"):
        denoising_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_masked_denoising_normalisations():
    pred, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    target[:, :, :4] = 1.0                       # error 1 in the top half, 0 below
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1                           # sample 0: mask exactly on the error
    mask[1, :, :2] = 1                           # sample 1: a quarter of the image, on the error
    area = denoising_loss(pred, target, mask, "area")
    mean = denoising_loss(pred, target, mask, "mean")
    assert area.shape == (2,) and torch.allclose(area, torch.tensor([1.0, 1.0]))
    assert torch.allclose(mean, torch.tensor([0.5, 0.25]))
    assert torch.allclose(denoising_loss(pred, target), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("variant", ["mse_maxnorm", "mass_ratio"])
def test_mask_attention_loss_prefers_maps_inside_the_mask(variant):
    mask = square_mask()
    inside = torch.nn.functional.interpolate(mask, size=(16, 16), mode="area").squeeze(1) * 0.01
    outside = 0.01 - inside
    uniform = torch.full_like(inside, 0.005)
    loss = {name: mask_attention_loss(m, mask, variant) for name, m in
            {"inside": inside, "outside": outside, "uniform": uniform}.items()}
    assert loss["inside"].shape == (3,)
    assert (loss["inside"] < 1e-6).all()
    assert (loss["inside"] < loss["uniform"]).all() and (loss["uniform"] < loss["outside"]).all()


def test_mass_ratio_is_scale_free_and_maxnorm_compares_shape():
    mask = square_mask(b=2)
    attn = torch.rand(2, 16, 16)
    assert torch.allclose(mask_attention_loss(attn, mask, "mass_ratio"), mask_attention_loss(attn * 7, mask, "mass_ratio"))
    assert torch.allclose(mask_attention_loss(attn, mask, "mse_maxnorm"), mask_attention_loss(attn * 7, mask, "mse_maxnorm"))
    with pytest.raises(ValueError, match="mse_maxnorm"):
        mask_attention_loss(attn, mask, "bogus")


def test_attention_metrics():
    mask = square_mask(b=1)
    inside = torch.nn.functional.interpolate(mask, size=(16, 16), mode="area").squeeze(1)
    assert torch.allclose(attention_mass_inside(inside, mask), torch.tensor([1.0]))
    assert torch.allclose(attention_iou(inside, mask), torch.tensor([1.0]))
    assert torch.allclose(attention_iou(1 - inside, mask), torch.tensor([0.0]))
    half = torch.ones(1, 16, 16)
    assert torch.allclose(attention_mass_inside(half, mask), torch.tensor([0.25]))


def test_offset_l2_is_per_sample():
    offset = torch.zeros(3, 2, 4)
    offset[1] = 2.0
    assert torch.equal(offset_l2(offset), torch.tensor([0.0, 4.0, 0.0]))


def test_contrast_loss_charges_a_word_that_does_not_beat_another_objects():
    own = torch.tensor([0.10, 0.10, 0.10])
    swapped = torch.tensor([0.10, 0.20, 0.05])          # same word / clearly worse / better than own
    loss = contrast_loss(own, swapped, margin=0.05)
    assert loss.shape == (3,)
    assert torch.isclose(loss[0], torch.tensor(0.05))   # a word shared by every object pays the margin
    assert loss[1] == 0                                  # the other object's word loses by more than the margin
    assert loss[2] > loss[0]                             # another object's word explains the image better


def test_word_target_loss_reads_the_direction_and_skips_objects_without_a_target():
    target = torch.randn(4, 2, 16)
    words = target * torch.tensor([1.0, 3.0, 1.0, 1.0])[:, None, None]      # rows 0, 1: the target's direction
    words[2] = -target[2]                                                    # row 2: opposite
    words[3] = torch.randn(2, 16)
    loss = word_target_loss(words, target, torch.tensor([1, 1, 1, 0]))
    assert loss.shape == (4,)
    assert loss[0].abs() < 1e-6 and loss[1].abs() < 1e-6                    # the norm is not chased
    assert torch.isclose(loss[2], torch.tensor(2.0))
    assert loss[3] == 0                                                      # no target: no loss
    moving = words.clone().requires_grad_(True)
    word_target_loss(moving, target, torch.ones(4)).sum().backward()
    assert moving.grad[2].abs().sum() > 0


def test_identity_loss_rewards_codes_that_pick_out_their_own_object():
    objects = torch.tensor([0, 0, 1, 1, 2])
    separated = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0.1, 0.9, 0], [0, 0, 1.0]])
    mixed = separated[torch.tensor([0, 2, 1, 4, 3])]
    good, bad = identity_loss(separated, objects), identity_loss(mixed, objects)
    assert good.shape == (5,) and good[4] == 0          # an object seen once has no partner
    assert good[:4].mean() < bad[:4].mean()
    codes = separated.clone().requires_grad_(True)
    identity_loss(codes, objects).sum().backward()
    assert codes.grad.abs().sum() > 0
