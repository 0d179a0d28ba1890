"""The floor on paper: one training step counted on the meta device (no weights).

    python -m bench.floor                # SD 1.5 at 512 px, batch 4; BENCHMARKS.md quotes it
    python -m bench.floor --model sdxl   # SDXL base 1.0 at 1024 px, batch 1 and 2

The model's UNet, text encoder(s) and VAE are built from their public configs with no weights
(MODELS below: one small spec per model). One training step is counted with
torch.utils.flop_counter for
  (a) plain textual inversion: VAE encode (no grad), text encoder(s) and UNet forward, backward
      to the input embeddings (frozen weights get no weight gradients);
  (b) (a) plus the attention capture of this framework at the model's default layers (SD 1.5:
      16x16, SDXL: 32x32) and the shape word's head (mask-set encoder at the model's D: 768 for
      SD 1.5, 2048 for SDXL; counted on CPU with real tensors, it is small);
  (c) (a) plus capture for two words (shape, pose) and all four heads.
Memory in bf16: frozen weights; activations autograd keeps for backward, counted as flash
attention keeps them (q, k, v, output and the log-sum-exp, never the N x N matrix), with and
without gradient checkpointing; the heads in fp32 with AdamW state (16 bytes per parameter).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

BATCH, RESOLUTION, TOKENS, H100_BF16_FLOPS = 4, 512, 77, 800e12
GIB = 2 ** 30


# -- the models, on meta ----------------------------------------------------------------------------
def _clip_l(dtype):
    """CLIP ViT-L/14's text encoder (SD 1.5's; SDXL's text_encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).to(dtype)


def _sd_vae(sample_size: int, dtype):
    """SD's VAE (SD 1.5 and SDXL share the architecture)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=sample_size).to(dtype)


def sd15_modules(dtype=torch.bfloat16):
    """SD 1.5's UNet, CLIP ViT-L/14 text encoder and VAE from their public configs, on meta."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).to(dtype)
        text = _clip_l(dtype)
        vae = _sd_vae(RESOLUTION, dtype)
    for module in (unet, text, vae):
        module.requires_grad_(False)
    return unet, text, vae


def sdxl_modules(dtype=torch.bfloat16):
    """SDXL base 1.0's UNet, text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG, with
    projection) and VAE from their public configs, on meta."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, upcast_attention=False).to(dtype)
        text = _clip_l(dtype)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)).to(dtype)
        vae = _sd_vae(1024, dtype)
    for module in (unet, text, text_2, vae):
        module.requires_grad_(False)
    return unet, text, text_2, vae


def last_hidden_state(encoders, ids):
    """SD 1.x: the text encoder's last hidden state [B, 77, 768]; no added conditioning."""
    (text,) = encoders
    return text(input_ids=ids).last_hidden_state, None


def sdxl_conditioning(encoders, ids):
    """SDXL: both encoders' penultimate hidden states concatenated [B, 77, 768 + 1280]; added
    conditioning: text_encoder_2's projected pooled embedding [B, 1280] and the time ids [B, 6]."""
    encoded = [encoder(input_ids=ids, output_hidden_states=True) for encoder in encoders]
    hidden = torch.cat([out.hidden_states[-2] for out in encoded], dim=-1)
    pooled = encoded[-1].text_embeds
    return hidden, {"text_embeds": pooled, "time_ids": pooled.new_zeros(ids.shape[0], 6)}


@dataclass(frozen=True)
class ModelSpec:
    """What bench.floor needs to know about a model (MODELS holds one per --model choice)."""
    title: str
    build: Callable[[], dict]      # -> {name: module} on meta: "UNet", "text encoder"[, "text encoder 2"], "VAE"
    encode_text: Callable          # (text encoders, ids [B, 77]) -> (hidden [B, 77, D], added_cond_kwargs or None)
    resolution: int                # pixels; latents are resolution / 8
    batches: tuple[int, ...]
    dim: int                       # D: the width of a word's embedding (the heads' output)
    card_gib: float | None = None  # also print the fit on a card of this size and the capture's memory share


MODELS = {
    "sd15": ModelSpec("SD 1.5", lambda: dict(zip(("UNet", "text encoder", "VAE"), sd15_modules())),
                      last_hidden_state, RESOLUTION, (BATCH,), 768),
    "sdxl": ModelSpec("SDXL base 1.0",
                      lambda: dict(zip(("UNet", "text encoder", "text encoder 2", "VAE"), sdxl_modules())),
                      sdxl_conditioning, 1024, (1, 2), 2048, card_gib=24),
}


def text_encoders(modules: dict) -> list:
    return [m for name, m in modules.items() if name.startswith("text encoder")]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- one step ---------------------------------------------------------------------------------------
def aliases(t: torch.Tensor, params: set[int]) -> bool:
    """Whether t is one of the parameters (ids in `params`) or a view of one (e.g. a weight's .t())."""
    while t is not None:
        if id(t) in params:
            return True
        t = t._base
    return False


@contextlib.contextmanager
def flash_style_saving(saved: list, params: set[int] = frozenset(), aliased: list | None = None):
    """Tensors autograd saves, with SDPA counted as flash attention saves: q, k, v, out, lse.

    Saved tensors that are frozen parameters (ids in `params`) or views of them (a linear layer's
    backward to its input needs the weight) are counted in `saved` too, and also in `aliased`:
    on a GPU they take no memory beyond the weights."""
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.no_grad():
            out = real_sdpa(q, k, v, *args, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved.extend(t.numel() * t.element_size() for t in (q, k, v, out, lse))
        return out.requires_grad_(q.requires_grad or k.requires_grad or v.requires_grad)

    def pack(t):
        saved.append(t.numel() * t.element_size())
        if aliased is not None and aliases(t, params):
            aliased.append(saved[-1])
        return t
    F.scaled_dot_product_attention = sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        F.scaled_dot_product_attention = real_sdpa


def unet_step(spec: ModelSpec, modules: dict, batch: int, capture_columns: int, layers=None):
    """One step's VAE encode, text encoder(s) and UNet forward; -> the loss and the word inputs (meta)."""
    from guided_concepts.capture import AttentionStore, install_capture
    device = torch.device("meta")
    unet, vae, latent = modules["UNet"], modules["VAE"], spec.resolution // 8
    pixels = torch.empty(batch, 3, spec.resolution, spec.resolution, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean                           # [B, 4, latent, latent]
    # The words enter as token embeddings that need a gradient (the placeholder rows are written
    # there), on every text encoder's embedding output.
    words = []
    handles = [encoder.get_input_embeddings().register_forward_hook(
        lambda m, i, out: words.append(out.detach().requires_grad_()) or words[-1])
        for encoder in text_encoders(modules)]
    ids = torch.zeros(batch, TOKENS, dtype=torch.long, device=device)
    hidden, added = spec.encode_text(text_encoders(modules), ids)                 # [B, 77, D]
    for handle in handles:
        handle.remove()
    store = AttentionStore()
    if capture_columns:
        install_capture(unet, store, layers)
        selection = torch.empty(batch, TOKENS, capture_columns, device=device, dtype=torch.bfloat16)
        store.begin(hidden, selection, (latent, latent), layout_known=True)
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor(AttnProcessor2_0())
    t = torch.zeros(batch, dtype=torch.long, device=device)
    pred = unet(latents, t, hidden, added_cond_kwargs=added).sample
    loss = pred.float().pow(2).mean()
    if capture_columns:
        loss = loss + store.collect().float().mean()
    return loss, words


def head_flops(names: list[str], dim: int = 768, batch: int = BATCH) -> tuple[float, int]:
    """Forward + backward FLOPs of the heads at `batch` with D = `dim` (CPU, real tensors), and
    their parameter count."""
    from guided_concepts.concepts import CONCEPTS
    from guided_concepts.objectdata import ObjectViewsDataset, collate, ensure_default_data, scan_objects
    records = scan_objects(ensure_default_data())
    heads, total_params = {}, 0
    for n in names:
        cls, config_cls, loss_cls = CONCEPTS[n]
        config = config_cls()
        info = {"elevation": (0.0, 30.0), "distance": (2.0, 3.0), "num_keypoints": 10}
        config = cls.fit_to_data(config, info)
        image_encoder = None
        if cls.requirements(config).image_encoder:
            from guided_concepts.backbone.tiny import build_tiny_pipeline
            from guided_concepts.backbone.load import FrozenImageEncoder
            image_encoder = FrozenImageEncoder(build_tiny_pipeline().image_encoder)
        heads[n] = cls(config, loss_cls(), torch.randn(config.num_vectors, dim) * 0.01, image_encoder)
        total_params += sum(p.numel() for p in heads[n].parameters() if p.requires_grad)
    set_size = max((type(heads[n]).requirements(heads[n].config).mask_set[0] for n in names), default=0)
    data = ObjectViewsDataset(records[:4], 64, 0.0, mask_set_size=set_size)
    samples = collate([data[i * 6] for i in range(batch)])
    with FlopCounterMode(display=False) as counter:
        loss = sum(heads[n].encode(samples).embeds.float().pow(2).mean() for n in names)
        loss.backward()
    return float(counter.get_total_flops()), total_params


def estimate(variant: str, spec: ModelSpec, modules: dict, layers, batch: int) -> dict:
    columns = {"a": 0, "b": 1, "c": 2}[variant]
    unet = modules["UNet"]
    with FlopCounterMode(display=False, depth=1) as counter:
        loss, _ = unet_step(spec, modules, batch, columns, layers)
        loss.backward()
    flops = float(counter.get_total_flops())
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    vae_flops = by_module.get("Encoder", 0.0)               # the VAE encoder (no grad); gone with cached latents
    unet_flops = by_module.get(type(unet).__name__, 0.0)
    # The rest is the text encoders, forward and backward (and the VAE's 1x1 quant_conv, MFLOPs): by
    # name they would lose their backward when they return all hidden states (SDXL), as the module
    # tracker then never sees the backward enter them.
    text_flops = flops - vae_flops - unet_flops
    names = {"a": [], "b": ["shape"], "c": ["shape", "pose", "appearance", "style"]}[variant]
    heads, head_params = head_flops(names, spec.dim, batch) if names else (0.0, 0)
    params = {id(p) for m in modules.values() for p in m.parameters()}
    saved, aliased = [], []
    with flash_style_saving(saved, params, aliased):
        unet_step(spec, modules, batch, columns, layers)
    unet.enable_gradient_checkpointing()
    saved_ckpt, aliased_ckpt = [], []
    with flash_style_saving(saved_ckpt, params, aliased_ckpt):
        unet_step(spec, modules, batch, columns, layers)
    unet.disable_gradient_checkpointing()
    return {"flops": flops + heads, "head_flops": heads, "head_params": head_params, "vae_flops": vae_flops,
            "unet_flops": unet_flops, "text_flops": text_flops,
            "activations": sum(saved), "activations_ckpt": sum(saved_ckpt),
            # of which frozen weights saved for backward (no memory beyond the weights on a GPU)
            "weights_saved": sum(aliased), "weights_saved_ckpt": sum(aliased_ckpt)}


# -- the report -------------------------------------------------------------------------------------
def summary(spec: ModelSpec, rows: dict, weight_bytes: int) -> list[str]:
    """All four words ((c)) on a card of spec.card_gib, and the capture's extra activations ((c) minus
    (a)), both without the frozen weights that the table's activations include (autograd saves them
    for backward, but they are the weights, already counted once)."""
    saved, fit, share = [], [], []
    for b, r in rows.items():
        a, c, heads_mem = r["a"], r["c"], 16 * r["c"]["head_params"]
        saved.append(f"batch {b}: {c['weights_saved'] / GIB:.2f}, "
                     f"with checkpointing {c['weights_saved_ckpt'] / GIB:.2f}")
        fits, shares = [], []
        for label, ckpt in (("", ""), ("with checkpointing ", "_ckpt")):
            own_a = a["activations" + ckpt] - a["weights_saved" + ckpt]       # memory of their own
            own_c = c["activations" + ckpt] - c["weights_saved" + ckpt]
            total = (weight_bytes + own_c + heads_mem) / GIB
            fits.append(f"{label}{total:.2f} GiB ({'fits' if total <= spec.card_gib else 'does not fit'})")
            shares.append(f"{label}{(own_c - own_a) / 2 ** 20:.1f} MiB = {100 * (own_c - own_a) / own_a:.1f} % "
                          f"of (a)'s {own_a / GIB:.2f} GiB")
        fit.append(f"batch {b}: " + ", ".join(fits))
        share.append(f"batch {b}: " + ", ".join(shares))
    return ["Frozen weights within the activations above ((c); autograd saves them for backward, they take no "
            "memory beyond the weights), GiB: " + "; ".join(saved) + ".",
            f"All four words ((c): weights + activations without those + heads and AdamW) in {spec.card_gib:g} GiB: "
            + "; ".join(fit) + ".",
            "Capture's extra activations ((c) minus (a), without those): " + "; ".join(share) + "."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd15", help="which model's step to count (default sd15)")
    spec = MODELS[p.parse_args(argv).model]
    from guided_concepts.capture import choose_layers, cross_attention_layers
    modules = spec.build()
    latent = spec.resolution // 8
    layers = choose_layers(modules["UNet"], latent, None)
    weights = {name: count_params(m) for name, m in modules.items()}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in weights.items()))
    sizes = sorted({latent // f for name, f in cross_attention_layers(modules["UNet"]).items() if name in layers})
    print(f"captured layers ({', '.join(f'{s}x{s}' for s in sizes)}): {len(layers)}")
    rows = {b: {v: estimate(v, spec, modules, layers, b) for v in "abc"} for b in spec.batches}
    weight_bytes = 2 * sum(weights.values())
    lines = ["| variant | TFLOP per step (VAE / text / UNet / heads) | vs (a) | with cached latents | vs (a) | "
             "H100 floor (ms, 800 TFLOP/s; cached) | activations (GiB) | with grad. checkpointing (GiB) | "
             "heads + AdamW (GiB) | total, no ckpt (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b, by_variant in rows.items():
        base = by_variant["a"]
        for v, r in by_variant.items():
            heads_mem = 16 * r["head_params"]
            total = weight_bytes + r["activations"] + heads_mem
            cached, cached_a = r["flops"] - r["vae_flops"], base["flops"] - base["vae_flops"]
            parts = " / ".join(f"{r[k] / 1e12:.3f}" for k in ("vae_flops", "text_flops", "unet_flops", "head_flops"))
            label = f"({v})" if len(rows) == 1 else f"({v}), batch {b}"
            lines.append(f"| {label} | {r['flops'] / 1e12:.2f} ({parts}) | {r['flops'] / base['flops']:.4f} | "
                         f"{cached / 1e12:.2f} | {cached / cached_a:.4f} | "
                         f"{1000 * r['flops'] / H100_BF16_FLOPS:.1f}; {1000 * cached / H100_BF16_FLOPS:.1f} | "
                         f"{r['activations'] / GIB:.2f} | {r['activations_ckpt'] / GIB:.2f} | "
                         f"{heads_mem / GIB:.3f} | {total / GIB:.2f} |")
    text_out = (f"{spec.title} at {spec.resolution} px, batch {' and '.join(map(str, spec.batches))}, "
                f"bf16 frozen weights {weight_bytes / GIB:.2f} GiB "
                f"({', '.join(f'{k} {v / 1e6:.1f}M' for k, v in weights.items())} parameters).\n\n"
                + "\n".join(lines) + "\n")
    if spec.card_gib:
        text_out += "\n" + "\n".join(summary(spec, rows, weight_bytes)) + "\n"
    print(text_out)
    return rows, text_out


if __name__ == "__main__":
    main()
