"""ToyWorld's model sizes: an SD-format VAE, CLIP text model, tokenizer and UNet, built from config.

Sizes were chosen from step times measured on 2 CPU cores: VAE 0.33 s per batch-32 step
(0.95M parameters, 32 px -> 8x8x4), text encoder + UNet 0.47 s per batch-64 step (0.2M + 5.8M);
the whole pretraining fits in about an hour there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from guided_concepts.backbone.tiny import TINY_WORDS, whole_word_vocab_and_merges
from guided_concepts.toyworld.world import caption_words


@dataclass
class ToyWorldSizes:
    resolution: int = field(default=32, metadata={"help": "image size in pixels"})
    vae_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={"help": "VAE block widths (3 blocks: 4x downsampling)"})
    text_width: int = field(default=64, metadata={"help": "CLIP text model hidden size (= UNet cross-attention dim)"})
    text_layers: int = field(default=3, metadata={"help": "CLIP text model layers"})
    max_tokens: int = field(default=32, metadata={"help": "tokenizer model_max_length (captions are < 25 tokens)"})
    unet_channels: tuple[int, ...] = field(default=(64, 128, 128), metadata={"help": "UNet block widths"})
    unet_head_dim: int = field(default=16, metadata={"help": "UNet attention head dim"})


def toyworld_vocab(words: list[str] | None = None):
    """Whole-word tokens: a world's caption words (ToyWorld 1's by default) plus the tiny model's
    (framework templates), each ONE token."""
    return whole_word_vocab_and_merges(list(dict.fromkeys((caption_words() if words is None else words) + TINY_WORDS)))


def build_tokenizer(sizes: ToyWorldSizes, words: list[str] | None = None):
    from transformers import CLIPTokenizer
    vocab, merges = toyworld_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=sizes.max_tokens)


def build_text_encoder(sizes: ToyWorldSizes, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=sizes.text_width, intermediate_size=4 * sizes.text_width,
        num_hidden_layers=sizes.text_layers, num_attention_heads=4, max_position_embeddings=sizes.max_tokens,
        projection_dim=sizes.text_width, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def build_vae(sizes: ToyWorldSizes):
    from diffusers import AutoencoderKL
    blocks = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16, sample_size=sizes.resolution,
        block_out_channels=tuple(sizes.vae_channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
    )


def build_unet(sizes: ToyWorldSizes):
    """Cross-attention at every resolution below the top (latent/1, /2) and in the mid block."""
    from diffusers import UNet2DConditionModel
    latent = sizes.resolution // 2 ** (len(sizes.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, norm_num_groups=16, layers_per_block=1,
        block_out_channels=tuple(sizes.unet_channels), attention_head_dim=sizes.unet_head_dim,
        cross_attention_dim=sizes.text_width,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_scheduler():
    """SD's training noise schedule (DDPM, scaled linear, epsilon), so samplers behave as on SD."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)
