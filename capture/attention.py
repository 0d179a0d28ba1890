"""Capture the placeholder tokens' cross-attention maps, with gradients, in chosen layers only.

Captured layers run the stock fused processor for their output (so the UNet output is exactly
the stock one) and additionally compute softmax(QK^T) against the 77 text keys, keeping only the
placeholder columns, averaged over heads. Self-attention is never stored; every other layer keeps
PyTorch's fused attention untouched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, reduce


def cross_attention_layers(unet) -> dict[str, int]:
    """Processor name of every cross-attention layer -> its downsampling factor w.r.t. the latent.

    Read from the UNet config (every down block but the last halves the size), so nothing
    assumes 64x64 latents.
    """
    n_blocks = len(unet.config.block_out_channels)
    factors = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("down_blocks."):
            level = int(name.split(".")[1])
        elif name.startswith("up_blocks."):
            level = n_blocks - 1 - int(name.split(".")[1])
        else:                                                   # mid_block
            level = n_blocks - 1
        factors[name] = 2 ** level
    return factors


def choose_layers(unet, latent_size: int, resolutions: list[int] | None) -> list[str]:
    """Cross-attention layers whose map size is in `resolutions`.

    None picks the one size nearest (log scale) to max(16, latent/4): 16x16 for SD's 64x64
    latents (the size Break-A-Scene and the seed experiments use), 24x24 for SD 2's 96x96,
    16x16 for the tiny model's 16x16 latents.
    """
    layers = cross_attention_layers(unet)
    sizes = {name: latent_size // f for name, f in layers.items()}
    available = sorted(set(sizes.values()))
    if resolutions is None:
        target = max(16, latent_size / 4)
        resolutions = [min(available, key=lambda s: (abs(math.log(s / target)), -s))]
    missing = [r for r in resolutions if r not in available]
    if missing:
        raise ValueError(f"attention.resolutions {missing} not in this model; its cross-attention maps "
                         f"are {available} for {latent_size}x{latent_size} latents")
    return [name for name, s in sizes.items() if s in resolutions]


class AttentionStore:
    """Holds the maps captured in one UNet call (training) or averaged over a sampling run.

    begin(text_embeds [B, L, D], selection [B, L, C], ...) says which prompts carry which
    placeholder columns. With `layout_known` (training), incoming sample i is prompt i. Otherwise
    each incoming sample is matched to a prompt by content, so classifier-free guidance (or any
    other batch layout) works: samples with no match (the unconditional half) are ignored.

    After a training forward, `recording` goes off but the prompts stay set: gradient
    checkpointing recomputes the captured layers during backward, and they must run the same ops.
    """

    def __init__(self, latent_hw: tuple[int, int] | None = None):
        self.latent_hw = latent_hw
        self.text_embeds = None
        self.selection = None
        self.accumulate = False
        self.layout_known = False
        self.recording = True
        self.reset()

    def reset(self):
        self.maps: dict[str, torch.Tensor] = {}     # layer -> [B, C, h, w] (sum over calls)
        self.counts: dict[str, int] = {}

    def begin(self, text_embeds: torch.Tensor, selection: torch.Tensor, latent_hw: tuple[int, int],
              accumulate: bool = False, layout_known: bool = False):
        self.reset()
        self.text_embeds, self.selection = text_embeds.detach(), selection
        self.latent_hw, self.accumulate, self.layout_known, self.recording = tuple(latent_hw), accumulate, layout_known, True

    def end(self):
        self.text_embeds = self.selection = None
        self.recording = False

    def set_prompts(self, text_embeds: torch.Tensor, selection: torch.Tensor):
        self.text_embeds, self.selection = text_embeds.detach(), selection

    @torch.compiler.disable     # Python bookkeeping: under --compile, a clean graph break, not recompiles
    def match(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor | None:
        """For each incoming sample, the index of its prompt or -1.  -> [B_in]; None when sample i
        is prompt i for every i (training), so no sample needs to be picked out."""
        ref = self.text_embeds
        if self.layout_known and encoder_hidden_states.shape == ref.shape:
            return None
        ref = ref.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        if encoder_hidden_states.shape[1:] != ref.shape[1:]:
            return torch.full((encoder_hidden_states.shape[0],), -1, dtype=torch.long)
        diff = (encoder_hidden_states.detach()[:, None] - ref[None]).abs().flatten(2).amax(-1)  # [B_in, B]
        ok = (diff <= 1e-3 * ref.abs().amax().clamp(min=1.0)).cpu()
        # Identical prompts are assigned in order of arrival, so each gets its own sample.
        used = torch.zeros(ref.shape[0], dtype=torch.bool)
        index = torch.full((ok.shape[0],), -1, dtype=torch.long)
        for i in range(ok.shape[0]):
            free = (ok[i] & ~used).nonzero()
            candidates = free if len(free) else ok[i].nonzero()
            if len(candidates):
                index[i] = candidates[0, 0]
                used[index[i]] = True
        return index

    @torch.compiler.disable
    def add(self, layer: str, probs: torch.Tensor, prompt_index: torch.Tensor | None):
        """probs [b, N, C] of the matched samples, prompt_index [b] (their prompts; None: all, in order)."""
        n = probs.shape[1]
        factor = math.sqrt(self.latent_hw[0] * self.latent_hw[1] / n)
        h, w = round(self.latent_hw[0] / factor), round(self.latent_hw[1] / factor)
        maps = rearrange(probs, "b (h w) c -> b c h w", h=h, w=w)
        if prompt_index is None:
            full = maps
        else:
            full = maps.new_zeros((self.text_embeds.shape[0],) + maps.shape[1:])
            full = full.index_add(0, prompt_index.to(maps.device), maps)   # in the prompts' order
        if not self.recording:   # checkpoint recomputation: same ops as the forward, nothing kept
            return
        if self.accumulate and layer in self.maps:
            full = self.maps[layer] + full.detach()
            self.counts[layer] += 1
        else:
            self.counts[layer] = 1
        self.maps[layer] = full.detach() if self.accumulate else full

    def collect(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean over captured layers (and over calls when accumulating).  -> [B, C, H, W]

        Layers of different sizes are resized (bilinear) to the largest, or to `size`.
        """
        if not self.maps:
            raise RuntimeError("no cross-attention was captured: were placeholder prompts set, "
                               "and does the config ask for attention layers?")
        maps = [m / self.counts[k] for k, m in self.maps.items()]
        size = size or max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if tuple(m.shape[-2:]) == tuple(size) else
                F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return torch.stack(maps).mean(0)


class CaptureProcessor(AttnProcessor2_0):
    """Stock fused attention for the output, plus the placeholder columns of softmax(QK^T)."""

    def __init__(self, store: AttentionStore, layer: str):
        super().__init__()
        self.store, self.layer = store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None or self.store.text_embeds is None:
            return out
        if attn.group_norm is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"{self.layer}: attention capture supports transformer-block cross-attention only")
        prompt_index = self.store.match(encoder_hidden_states)
        selection = self.store.selection
        if prompt_index is None:                    # training: every sample, in order; nothing to pick
            hs, ehs = hidden_states, encoder_hidden_states
        else:
            prompt_index = prompt_index.to(hidden_states.device)
            keep = prompt_index >= 0
            if not keep.any():
                return out
            hs, ehs, prompt_index = hidden_states[keep], encoder_hidden_states[keep], prompt_index[keep]
            selection = selection.to(prompt_index.device)[prompt_index]
        if attn.norm_cross:
            ehs = attn.norm_encoder_hidden_states(ehs)
        query = attn.head_to_batch_dim(attn.to_q(hs))                      # [b*heads, N, d]
        key = attn.head_to_batch_dim(attn.to_k(ehs))                       # [b*heads, L, d]
        probs = attn.get_attention_scores(query, key, None)                # [b*heads, N, L]
        probs = reduce(probs, "(b heads) n l -> b n l", "mean", heads=attn.heads)
        selection = selection.to(probs.device, probs.dtype)                                 # [b, L, C]
        self.store.add(self.layer, torch.bmm(probs, selection).float(), prompt_index)       # [b, N, C]
        return out


def install_capture(unet, store: AttentionStore, layers: list[str]) -> None:
    """Capture processors in `layers`, stock fused AttnProcessor2_0 everywhere else."""
    unet.set_attn_processor({name: (CaptureProcessor(store, name) if name in layers else AttnProcessor2_0())
                             for name in unet.attn_processors})


@contextmanager
def capture_attention(unet, store: AttentionStore, layers: list[str]):
    """Install capture processors in `layers` (stock AttnProcessor2_0 elsewhere); restore after."""
    original = unet.attn_processors
    install_capture(unet, store, layers)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
