"""Small trainable offsets on the frozen UNet's attention projections (E4T's domain tuning).

Two kinds, both zero-initialised so that step 0 is exactly the base model:
- "lora": LoRA through peft, W x + B A x;
- "e4t":  E4T-style weight offsets, (W ⊙ (1 + B A)) x, with an L2 penalty on Δ = B A.
Either exports to a diffusers LoRA file (`pipe.load_lora_weights`): LoRA as is, E4T offsets as
the SVD of their dense update W ⊙ Δ (exact at full rank).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from guided_concepts.choices import check_choices
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_KINDS = ("none", "lora", "e4t")
ADAPTER_LAYERS = {
    "cross_kv": r".*attn2\.to_(k|v)$",                       # cross-attention keys and values
    "cross_kv_self_qkv": r".*(attn2\.to_(k|v)|attn1\.to_(q|k|v))$",
}


@dataclass
class AdapterConfig:
    kind: Literal[ADAPTER_KINDS] = field(default="none", metadata={"help": f"one of {ADAPTER_KINDS}"})
    layers: Literal[tuple(ADAPTER_LAYERS)] = field(default="cross_kv", metadata={"help": f"which projections: {', '.join(ADAPTER_LAYERS)}"})
    rank: int = field(default=4, metadata={"help": "rank of the low-rank update"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the adapters (phase 2)"})
    start_step: int = field(default=-1, metadata={"help": "phase 2 (adapters train) starts here; -1 = half of train.steps"})
    l2_weight: float = field(default=1e-4, metadata={"help": "L2 penalty on the E4T offsets Δ"})
    head_lr_scale: float = field(default=1.0, metadata={"help": "phase 2 multiplies the heads' lrs by this"})

    def __post_init__(self):
        check_choices(self)


class OffsetLinear(nn.Module):
    """E4T weight offsets on a frozen Linear: y = x (W ⊙ (1 + B A))^T + b; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)   # A [r, in]
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))                              # B [out, r]

    def delta(self) -> torch.Tensor:
        return self.up @ self.down                                                                # [out, in]

    def forward(self, x):
        weight = self.base.weight * (1 + self.delta().to(self.base.weight.dtype))
        return F.linear(x, weight, self.base.bias)


class UNetAdapters:
    """Adds adapters to a UNet and gives their parameters, state, penalty and LoRA export."""

    def __init__(self, unet: nn.Module, config: AdapterConfig):
        self.unet, self.config = unet, config
        pattern = re.compile(ADAPTER_LAYERS[config.layers])
        self.targets = [n for n, m in unet.named_modules() if pattern.match(n) and isinstance(m, nn.Linear)]
        if config.kind == "lora":
            from peft import LoraConfig
            unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights=True,
                                        target_modules=ADAPTER_LAYERS[config.layers]))
        elif config.kind == "e4t":
            for name in self.targets:
                parent, child = name.rsplit(".", 1)
                module = unet.get_submodule(parent)
                setattr(module, child, OffsetLinear(getattr(module, child), config.rank))
        self.set_trainable(False)

    def parameters(self) -> list[nn.Parameter]:
        marker = "lora_" if self.config.kind == "lora" else (".down", ".up")
        return [p for n, p in self.unet.named_parameters() if (marker in n if isinstance(marker, str) else n.endswith(marker))]

    def set_trainable(self, on: bool):
        for p in self.parameters():
            p.requires_grad_(on)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.parameters()}
        return {n: p.detach().float().cpu() for n, p in self.unet.named_parameters() if id(p) in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        params = dict(self.unet.named_parameters())
        missing = [k for k in state if k not in params]
        if missing or len(state) != len(self.parameters()):
            raise ValueError(f"adapter state does not match this UNet/config (unknown: {missing[:3]})")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def penalty(self) -> torch.Tensor:
        """Mean squared E4T offset Δ (0 for LoRA, whose size the lr and rank bound)."""
        if self.config.kind != "e4t":
            return torch.zeros(())
        deltas = [m.delta() for m in self.unet.modules() if isinstance(m, OffsetLinear)]
        return torch.stack([d.pow(2).mean() for d in deltas]).mean()

    def lora_state_dict(self, rank: int | None = None) -> dict[str, torch.Tensor]:
        """PEFT-named LoRA tensors ("<module>.lora_A.weight" [r, in], "<module>.lora_B.weight" [out, r])
        for `StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=...)`."""
        if self.config.kind == "lora":
            from peft import get_peft_model_state_dict
            return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(self.unet).items()}
        out = {}
        for name, module in self.unet.named_modules():
            if isinstance(module, OffsetLinear):
                dense = (module.base.weight.float() * module.delta().float()).detach().cpu()   # W ⊙ Δ
                u, s, vh = torch.linalg.svd(dense, full_matrices=False)
                r = rank or len(s)
                out[f"{name}.lora_A.weight"] = (s[:r, None] * vh[:r]).contiguous()          # [r, in]
                out[f"{name}.lora_B.weight"] = u[:, :r].contiguous()                        # [out, r]
        return out

    def export_lora(self, directory: str | Path, rank: int | None = None) -> Path:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        sdxl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline     # SDXL's loader reads its own
        pipeline.save_lora_weights(str(directory), unet_lora_layers=self.lora_state_dict(rank), safe_serialization=True)
        return Path(directory) / "pytorch_lora_weights.safetensors"
