"""A tiny Stable-Diffusion-shaped model, built from config with a fixed seed.

It is saved with `save_pretrained` and read back with `from_pretrained`, the same path real
weights take, so a laptop run exercises the real loading code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

TINY_MODEL_VERSION = "v1"

# Words the tiny tokenizer knows whole. Everything else falls back to byte-level pieces,
# exactly as CLIP's BPE does for rare words.
TINY_WORDS = """
a an the of in on with and photo rendering picture image drawing painting sketch view render
shape pose style appearance texture object thing chair chairs table sofa dog cat car lamp bed
red green blue white black yellow brown gray wooden metal plastic leopard print striped
camera angle front side back top left right made colorful simple close up
""".split()


def tiny_vocab_and_merges(words=TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab: 256 byte symbols (+ their end-of-word forms) and whole words.

    Each word gets the left-to-right chain of merges that builds it. That is meant to make it ONE
    token, but another word's merges can outrank the chain (whole_word_vocab_and_merges repairs it;
    the tiny model keeps this tokenizer so that its seeded weights stay what they were).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


def bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How byte-level BPE splits `word` (ASCII) with merges of these ranks: the lowest-ranked
    adjacent pair is merged until none is left."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def whole_word_vocab_and_merges(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiny_vocab_and_merges, repaired so that every word really is ONE token.

    A word's chain of merges can be outranked by an earlier word's ("b"+"l" from "blue" fires
    inside "table" before "ta"+"b"), leaving it in pieces. Each such word gets extra merges joining
    the pieces it actually splits into; appended last, they cannot change any earlier word."""
    vocab, merges = tiny_vocab_and_merges(words)
    ranks = {pair: r for r, pair in enumerate(merges)}
    for word in dict.fromkeys(words):
        pieces = bpe_pieces(word, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


# Model registry: name -> what differs from the shared tiny text side and scheduler.
TINY_LAYOUTS = {
    # The default: 64 px images, VAE 4x -> 16x16 latents; cross-attention at 16x16 (down 0, up 1)
    # and 8x8 (mid), like SD's 64/32/16/8 ladder cut short. Quick on a laptop.
    "tiny": dict(
        image_size=64,
        vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1),
        unet=dict(layers_per_block=1, block_out_channels=(32, 64), attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    ),
    # SD 1.5's block layout with tiny widths: 512 px, VAE 8x -> 64x64 latents, two layers per
    # block, cross-attention at 64/32/16 (down and up) and 8 (mid). Its cost profile (where the
    # time and memory go) is close to the real model's; for benchmarks, not for a quick run.
    "tiny-sd15": dict(
        image_size=512,
        vae=dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1),
        unet=dict(layers_per_block=2, block_out_channels=(32, 64, 64, 64), attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    ),
    # SDXL's layout with tiny widths (StableDiffusionXLPipeline): two text encoders (the second
    # with a projection, whose pooled output conditions the UNet with the size/crop time ids),
    # hidden sizes 32 + 48 concatenated (768 + 1280 in SDXL), a first down block without
    # attention, transformer depths 1 and 2 (SDXL: 2 and 10). 64 px images, VAE 2x -> 32x32
    # latents; cross-attention at 16x16 and 8x8, none at the latent size, as SDXL at 1024 px.
    "tiny-sdxl": dict(
        image_size=64,
        sdxl=dict(text_hidden_2=48, projection_dim=32, addition_time_embed_dim=8),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, scaling_factor=0.13025, force_upcast=True),
        unet=dict(layers_per_block=1, block_out_channels=(32, 64, 64), attention_head_dim=4,
                  transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    ),
}


def build_tiny_pipeline(seed: int = 0, attention_sharpness: float = 4.0, layout: str = "tiny"):
    """Build a tiny StableDiffusionPipeline (StableDiffusionXLPipeline for an `sdxl` layout) from
    config (random weights, fixed seed).

    `attention_sharpness` scales the cross-attention query and key weights. Random weights give
    near-uniform cross-attention that no token embedding can move; scaled up, the tiny model
    attends as sharply as a trained one, so attention losses have something to act on.
    """
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    spec = TINY_LAYOUTS[layout]
    torch.manual_seed(seed)
    vocab, merges = tiny_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_config = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    xl = spec.get("sdxl")
    unet_extra = {"cross_attention_dim": 32}
    if xl:
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{
            **text_config, "hidden_size": xl["text_hidden_2"], "intermediate_size": 2 * xl["text_hidden_2"],
            "projection_dim": xl["projection_dim"]}))
        unet_extra = {"cross_attention_dim": 32 + xl["text_hidden_2"], "addition_embed_type": "text_time",
                      "addition_time_embed_dim": xl["addition_time_embed_dim"],
                      "projection_class_embeddings_input_dim": xl["projection_dim"] + 6 * xl["addition_time_embed_dim"]}
    blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, sample_size=spec["image_size"],
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        **spec["vae"],
    )
    unet = UNet2DConditionModel(
        sample_size=spec["image_size"] // 2 ** (blocks - 1), in_channels=4, out_channels=4, norm_num_groups=8,
        **unet_extra, **spec["unet"],
    )
    sharpen_cross_attention(unet, attention_sharpness)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32,
    ))
    if xl:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), unet=unet,
            scheduler=scheduler, image_encoder=image_encoder, add_watermarker=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=image_encoder,
        requires_safety_checker=False,
    )


def sharpen_cross_attention(unet: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(factor)
                module.to_k.weight.mul_(factor)


def default_tiny_dir(layout: str = "tiny") -> Path:
    cache = Path(os.environ.get("GUIDED_CONCEPTS_CACHE", Path.home() / ".cache" / "guided_concepts"))
    name = "tiny-sd" if layout == "tiny" else layout
    return cache / f"{name}-{TINY_MODEL_VERSION}"


def ensure_tiny_model(path: str | Path | None = None, layout: str = "tiny") -> Path:
    """Write a tiny model once (atomically: build in a temp folder, then rename)."""
    path = Path(path) if path is not None else default_tiny_dir(layout)
    if (path / "model_index.json").exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    except OSError as err:        # a read-only home or cache: name the folder and what moves it
        raise OSError(err.errno, f"cannot write the tiny model there ({err.strerror}); set GUIDED_CONCEPTS_CACHE "
                      "to a folder you can write", str(path.parent)) from err
    try:
        build_tiny_pipeline(layout=layout).save_pretrained(tmp)
        (tmp / "guided_concepts.json").write_text(json.dumps({"tiny_model_version": TINY_MODEL_VERSION, "layout": layout}))
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
