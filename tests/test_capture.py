"""Attention capture: stock outputs, chosen layers only, CFG-safe, gradients, SD 1.5 layout."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from guided_concepts.capture import AttentionStore, CaptureProcessor, capture_attention, choose_layers, cross_attention_layers


def sd15_layout_unet() -> UNet2DConditionModel:
    """SD 1.5's block layout (attention at 64/32/16/8 for 512 px), with tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def inputs(unet, batch=2, text_len=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, text_len, unet.config.cross_attention_dim, generator=g)
    selection = torch.zeros(batch, text_len, 2)
    selection[:, 5, 0] = 1            # concept 0 at position 5
    selection[:, 7:9, 1] = 1          # concept 1: two vectors
    return latents, text, selection


def test_layer_choice_follows_the_latent_size():
    unet = sd15_layout_unet()
    factors = cross_attention_layers(unet)
    assert sorted({64 // f for f in factors.values()}) == [8, 16, 32, 64]
    chosen = choose_layers(unet, 64, None)
    assert chosen and all(64 // factors[n] == 16 for n in chosen)          # SD 1.5 at 512 px -> 16x16
    assert all(96 // factors[n] == 24 for n in choose_layers(unet, 96, None))  # SD 2 at 768 px -> 24x24
    assert len(choose_layers(unet, 64, [32, 8])) == len([n for n in factors if 64 // factors[n] in (32, 8)])
    with pytest.raises(ValueError, match=r"not in this model.*\[8, 16, 32, 64\]"):
        choose_layers(unet, 64, [12])


@pytest.mark.parametrize("layout", ["tiny", "sd15_512px"])
def test_capture_keeps_the_stock_output_and_records_only_chosen_layers(layout, fresh_backbone):
    unet = fresh_backbone.unet if layout == "tiny" else sd15_layout_unet()
    size = unet.config.sample_size
    latents, text, selection = inputs(unet)
    t = torch.tensor([10, 500])
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(latents, t, text).sample
        layers = choose_layers(unet, size, None)
        store = AttentionStore((size, size))
        store.set_prompts(text, selection)
        with capture_attention(unet, store, layers):
            kinds = {n: type(p) for n, p in unet.attn_processors.items()}
            captured = unet(latents, t, text).sample
    assert torch.equal(captured, stock)
    assert {n for n, k in kinds.items() if k is CaptureProcessor} == set(layers)
    assert all(k is AttnProcessor2_0 for n, k in kinds.items() if n not in layers)   # fused elsewhere
    assert not any("attn1" in n for n in layers)                                     # never self-attention
    assert set(store.maps) == set(layers)
    maps = store.collect()
    assert maps.shape == (2, 2, 16, 16)
    # Each column is a softmax probability: between 0 and 1 per pixel; concept 1 holds two columns.
    assert maps.min() >= 0 and maps[:, 0].max() <= 1 and maps[:, 1].max() <= 2
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())  # restored


def test_capture_under_classifier_free_guidance_ignores_the_batch_layout(fresh_backbone):
    """Maps of the conditional prompts are the same whether the CFG batch is [uncond, cond],
    [cond, uncond] or cond alone; unconditional samples are never recorded."""
    unet = fresh_backbone.unet
    latents, text, selection = inputs(unet)
    uncond = torch.randn_like(text)
    t = torch.tensor([100, 100])
    layers = choose_layers(unet, 16, None)
    results = []
    for order in ("uncond_first", "cond_first", "cond_only"):
        if order == "uncond_first":
            lat, ehs = torch.cat([latents, latents]), torch.cat([uncond, text])
        elif order == "cond_first":
            lat, ehs = torch.cat([latents, latents]), torch.cat([text, uncond])
        else:
            lat, ehs = latents, text
        store = AttentionStore((16, 16))
        store.accumulate = True
        store.set_prompts(text, selection)
        with torch.no_grad(), capture_attention(unet, store, layers):
            unet(lat, t.repeat(len(lat) // 2), ehs)
            unet(lat, t.repeat(len(lat) // 2), ehs)       # a second "denoising step" is averaged in
        results.append(store.collect())
    assert torch.allclose(results[0], results[2], atol=1e-6)
    assert torch.allclose(results[1], results[2], atol=1e-6)
    assert not torch.allclose(results[2][0], results[2][1])   # two prompts, two different maps


def test_identical_prompts_each_get_their_own_map(fresh_backbone):
    unet = fresh_backbone.unet
    latents, text, selection = inputs(unet)
    text[1] = text[0]                       # same prompt twice, different latents
    store = AttentionStore((16, 16))
    store.set_prompts(text, selection)
    with torch.no_grad(), capture_attention(unet, store, choose_layers(unet, 16, None)):
        unet(latents, torch.tensor([50, 50]), text)
    maps = store.collect()
    assert maps[0].sum() > 0 and maps[1].sum() > 0 and not torch.allclose(maps[0], maps[1])


def test_captured_maps_carry_gradients_to_the_text_embeddings(fresh_backbone):
    unet = fresh_backbone.unet
    latents, text, selection = inputs(unet)
    text.requires_grad_(True)
    store = AttentionStore((16, 16))
    store.set_prompts(text, selection)
    with capture_attention(unet, store, choose_layers(unet, 16, None)):
        unet(latents, torch.tensor([10, 10]), text)
    store.collect()[:, 0, :8].sum().backward()
    assert text.grad is not None and text.grad[:, 5].abs().sum() > 0   # the placeholder position


def test_captured_map_equals_a_manual_softmax_column(fresh_backbone):
    """The stored map is softmax(QK^T / sqrt(d)) of the placeholder columns, averaged over heads,
    laid out row-major like the UNet's own (h w) flattening."""
    unet = fresh_backbone.unet
    latents, text, selection = inputs(unet)
    layer = choose_layers(unet, 16, None)[0]
    module = unet.get_submodule(layer.removesuffix(".processor"))
    seen = {}
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(hs=args[0] if args else kwargs["hidden_states"],
                                            ehs=kwargs["encoder_hidden_states"]), with_kwargs=True)
    store = AttentionStore((16, 16))
    store.set_prompts(text, selection)
    with torch.no_grad(), capture_attention(unet, store, [layer]):
        unet(latents, torch.tensor([10, 10]), text)
    handle.remove()
    hs, ehs = seen["hs"], seen["ehs"]
    b, n, _ = hs.shape
    heads = module.heads
    q = module.to_q(hs).view(b, n, heads, -1).transpose(1, 2)              # [b, heads, N, d]
    k = module.to_k(ehs).view(b, ehs.shape[1], heads, -1).transpose(1, 2)  # [b, heads, L, d]
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)   # [b, N, L]
    expected = torch.stack([probs[..., 5], probs[..., 7] + probs[..., 8]], dim=-1)        # [b, N, 2]
    expected = expected.transpose(1, 2).reshape(b, 2, 16, 16)
    assert torch.allclose(store.maps[layer], expected, atol=1e-5)
    # Row-major: pixel (row 3, col 11) is sequence position 3 * 16 + 11.
    assert torch.allclose(store.maps[layer][:, 0, 3, 11], probs[:, 3 * 16 + 11, 5], atol=1e-6)
