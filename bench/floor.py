"""The floor on paper: SD 1.5 at 512 px, batch 4, counted on the meta device (no weights).

    python -m bench.floor            # prints the table; BENCHMARKS.md quotes it

SD 1.5's UNet, text encoder and VAE are built from their public configs with no weights. One
training step is counted with torch.utils.flop_counter for
  (a) plain textual inversion: VAE encode (no grad), text encoder and UNet forward, backward to
      the input embeddings (frozen weights get no weight gradients);
  (b) (a) plus the attention capture of this framework at SD 1.5's default 16x16 layers and the
      shape word's head (mask-set encoder, D = 768; counted on CPU with real tensors, it is small);
  (c) (a) plus capture for two words (shape, pose) and all four heads.
Memory in bf16: frozen weights; activations autograd keeps for backward, counted as flash
attention keeps them (q, k, v, output and the log-sum-exp, never the N x N matrix), with and
without gradient checkpointing; the heads in fp32 with AdamW state (16 bytes per parameter).
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

BATCH, RESOLUTION, TOKENS, H100_BF16_FLOPS = 4, 512, 77, 800e12


def sd15_modules(dtype=torch.bfloat16):
    """SD 1.5's UNet, CLIP ViT-L/14 text encoder and VAE from their public configs, on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768)).to(dtype)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=RESOLUTION).to(dtype)
    for module in (unet, text, vae):
        module.requires_grad_(False)
    return unet, text, vae


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def flash_style_saving(saved: list):
    """Tensors autograd saves, with SDPA counted as flash attention saves: q, k, v, out, lse."""
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.no_grad():
            out = real_sdpa(q, k, v, *args, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved.extend(t.numel() * t.element_size() for t in (q, k, v, out, lse))
        return out.requires_grad_(q.requires_grad or k.requires_grad or v.requires_grad)

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    F.scaled_dot_product_attention = sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        F.scaled_dot_product_attention = real_sdpa


def unet_step(unet, text, vae, capture_columns: int, layers=None):
    """One step's VAE encode, text encoder and UNet forward; -> the loss (meta)."""
    from capture import AttentionStore, install_capture
    device = torch.device("meta")
    pixels = torch.empty(BATCH, 3, RESOLUTION, RESOLUTION, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean                           # [B, 4, 64, 64]
    # The words enter as token embeddings that need a gradient (the placeholder rows are written there).
    words = []
    embedding = text.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda m, i, out: words.append(out.detach().requires_grad_()) or words[-1])
    ids = torch.zeros(BATCH, TOKENS, dtype=torch.long, device=device)
    hidden = text(input_ids=ids).last_hidden_state                                # [B, 77, 768]
    handle.remove()
    store = AttentionStore()
    if capture_columns:
        install_capture(unet, store, layers)
        selection = torch.empty(BATCH, TOKENS, capture_columns, device=device, dtype=torch.bfloat16)
        store.begin(hidden, selection, (64, 64), layout_known=True)
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor(AttnProcessor2_0())
    t = torch.zeros(BATCH, dtype=torch.long, device=device)
    pred = unet(latents, t, hidden).sample
    loss = pred.float().pow(2).mean()
    if capture_columns:
        loss = loss + store.collect().float().mean()
    return loss, words[0]


def head_flops(names: list[str]) -> tuple[float, int]:
    """Forward + backward FLOPs of the heads at batch 4 with D = 768 (CPU, real tensors), and
    their parameter count."""
    from concepts import CONCEPTS
    from objectdata import ObjectViewsDataset, collate, ensure_default_data, scan_objects
    records = scan_objects(ensure_default_data())
    heads, total_params = {}, 0
    for n in names:
        cls, config_cls, loss_cls = CONCEPTS[n]
        config = config_cls()
        info = {"elevation": (0.0, 30.0), "distance": (2.0, 3.0), "num_keypoints": 10}
        config = cls.fit_to_data(config, info)
        image_encoder = None
        if cls.uses_image_encoder(config):
            from backbone.tiny import build_tiny_pipeline
            from backbone.load import FrozenImageEncoder
            image_encoder = FrozenImageEncoder(build_tiny_pipeline().image_encoder)
        heads[n] = cls(config, loss_cls(), torch.randn(config.num_vectors, 768) * 0.01, image_encoder)
        total_params += sum(p.numel() for p in heads[n].parameters() if p.requires_grad)
    set_size = max((getattr(heads[n].config, "max_views", 0) for n in names), default=0)
    data = ObjectViewsDataset(records[:4], 64, 0.0, mask_set_size=set_size)
    batch = collate([data[i * 6] for i in range(BATCH)])
    with FlopCounterMode(display=False) as counter:
        loss = sum(heads[n].encode(batch).embeds.float().pow(2).mean() for n in names)
        loss.backward()
    return float(counter.get_total_flops()), total_params


def estimate(variant: str, unet, text, vae, layers) -> dict:
    columns = {"a": 0, "b": 1, "c": 2}[variant]
    with FlopCounterMode(display=False, depth=1) as counter:
        loss, _ = unet_step(unet, text, vae, columns, layers)
        loss.backward()
    flops = float(counter.get_total_flops())
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    vae_flops = by_module.get("Encoder", 0.0)               # the VAE encoder (no grad); gone with cached latents
    names = {"a": [], "b": ["shape"], "c": ["shape", "pose", "appearance", "style"]}[variant]
    heads, head_params = head_flops(names) if names else (0.0, 0)
    saved: list[int] = []
    with flash_style_saving(saved):
        unet_step(unet, text, vae, columns, layers)
    activations = sum(saved)
    unet.enable_gradient_checkpointing()
    saved_ckpt: list[int] = []
    with flash_style_saving(saved_ckpt):
        unet_step(unet, text, vae, columns, layers)
    unet.disable_gradient_checkpointing()
    return {"flops": flops + heads, "head_flops": heads, "head_params": head_params, "vae_flops": vae_flops,
            "unet_flops": by_module.get("UNet2DConditionModel", 0.0), "text_flops": by_module.get("CLIPTextModel", 0.0),
            "activations": activations, "activations_ckpt": sum(saved_ckpt)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    from capture import choose_layers
    unet, text, vae = sd15_modules()
    layers = choose_layers(unet, 64, None)
    weights = {"UNet": count_params(unet), "text encoder": count_params(text), "VAE": count_params(vae)}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in weights.items()))
    print(f"captured layers (16x16): {len(layers)}")
    rows = {v: estimate(v, unet, text, vae, layers) for v in "abc"}
    weight_bytes = 2 * sum(weights.values())
    gib = 2 ** 30
    lines = ["| variant | TFLOP per step (VAE / text / UNet / heads) | vs (a) | with cached latents | vs (a) | "
             "H100 floor (ms, 800 TFLOP/s; cached) | activations (GiB) | with grad. checkpointing (GiB) | "
             "heads + AdamW (GiB) | total, no ckpt (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in rows.items():
        heads_mem = 16 * r["head_params"]
        total = weight_bytes + r["activations"] + heads_mem
        cached, cached_a = r["flops"] - r["vae_flops"], rows["a"]["flops"] - rows["a"]["vae_flops"]
        parts = " / ".join(f"{r[k] / 1e12:.3f}" for k in ("vae_flops", "text_flops", "unet_flops", "head_flops"))
        lines.append(f"| ({v}) | {r['flops'] / 1e12:.2f} ({parts}) | {r['flops'] / rows['a']['flops']:.4f} | "
                     f"{cached / 1e12:.2f} | {cached / cached_a:.4f} | "
                     f"{1000 * r['flops'] / H100_BF16_FLOPS:.1f}; {1000 * cached / H100_BF16_FLOPS:.1f} | "
                     f"{r['activations'] / gib:.2f} | {r['activations_ckpt'] / gib:.2f} | {heads_mem / gib:.3f} | "
                     f"{total / gib:.2f} |")
    text_out = (f"SD 1.5 at {RESOLUTION} px, batch {BATCH}, bf16 frozen weights {weight_bytes / gib:.2f} GiB "
                f"(UNet {weights['UNet'] / 1e6:.1f}M, text encoder {weights['text encoder'] / 1e6:.1f}M, "
                f"VAE {weights['VAE'] / 1e6:.1f}M parameters).\n\n" + "\n".join(lines) + "\n")
    print(text_out)
    return rows, text_out


if __name__ == "__main__":
    main()
