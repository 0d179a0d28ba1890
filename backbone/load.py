"""Load a frozen Stable Diffusion backbone: a diffusers folder, a hub id, or `tiny`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import kornia
import torch
from torch import nn

from guided_concepts.backbone.tiny import TINY_LAYOUTS, ensure_tiny_model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenImageEncoder(nn.Module):
    """A frozen CLIP vision tower: images [B, 3, H, W] in [-1, 1] -> embeddings [B, P]."""

    def __init__(self, model):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.size = model.config.image_size
        self.out_dim = getattr(model.config, "projection_dim", None) or model.config.hidden_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)      # frozen: no dropout, whatever the parent does

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = kornia.geometry.transform.resize((images.float() + 1) / 2, (self.size, self.size), antialias=True)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        with torch.no_grad():
            out = self.model(pixel_values=x)
        emb = out.image_embeds if hasattr(out, "image_embeds") and out.image_embeds is not None else out.pooler_output
        return emb.float()


@dataclass
class Backbone:
    path: str
    text_side: list          # [(tokenizer, text_encoder)]: one pair for SD 1.x/2.x, two for SDXL
    vae: nn.Module
    unet: nn.Module
    scheduler: object        # the training noise scheduler (DDPM), prediction type from its config
    image_encoder: FrozenImageEncoder | None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def is_sdxl(self) -> bool:
        """SDXL's UNet also takes the pooled text embedding and the size/crop time ids."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def kind(self) -> str:
        return "sdxl" if self.is_sdxl else "sd"

    def frozen_modules(self):
        mods = [self.vae, self.unet] + [te for _, te in self.text_side]
        return mods + ([self.image_encoder] if self.image_encoder is not None else [])

    def added_conditioning(self, pooled: torch.Tensor | None, batch: dict | None, size: int) -> dict | None:
        """SDXL's extra UNet inputs: the pooled text embedding and the time ids [B, 6] (the view's
        original size, its crop's top-left corner, the target size; from the data, as diffusers'
        SDXL training does; a batch without them counts as uncropped at `size`). None for SD."""
        if not self.is_sdxl:
            return None
        if pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding: use text_conditioning()")
        count = pooled.shape[0]
        target = torch.tensor([size, size], dtype=torch.float32).expand(count, 2)
        original = batch["original_size"].float() if batch is not None and "original_size" in batch else target
        corner = batch["crop_top_left"].float() if batch is not None and "crop_top_left" in batch else torch.zeros(count, 2)
        time_ids = torch.cat([original, corner, target], dim=-1).to(pooled.device, pooled.dtype)     # [B, 6]
        return {"text_embeds": pooled, "time_ids": time_ids}

    def pipeline_setting(self, key: str, default):
        """A setting of the model folder's model_index.json (e.g. SDXL's force_zeros_for_empty_prompt)."""
        index = Path(self.path, "model_index.json")
        return json.loads(index.read_text()).get(key, default) if index.is_file() else default

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Frozen modules to `dtype` (mixed precision). SDXL's VAE overflows in fp16 (its config says
        force_upcast, and diffusers' SDXL pipelines upcast it): it stays fp32 there; bf16 is safe."""
        for module in self.frozen_modules():
            if module is self.vae and dtype == torch.float16 and self.is_sdxl and getattr(self.vae.config, "force_upcast", False):
                continue
            module.to(dtype=dtype)


# Models that ship inside this repository: name -> folder (a diffusers SD folder).
SHIPPED_MODELS = {
    "toyworld": Path(__file__).resolve().parent.parent / "toyworld" / "weights",   # python -m toyworld pretrain
    "toyworld2": Path(__file__).resolve().parent.parent / "toyworld" / "weights2",  # ... --world toyworld2
}


def resolve_model_path(name: str) -> str:
    """'tiny' and 'tiny-sd15' are built from config on first use; SHIPPED_MODELS names are folders
    in the repository; anything else is a folder or hub id."""
    if name in TINY_LAYOUTS:
        return str(ensure_tiny_model(layout=name))
    if name in SHIPPED_MODELS:
        if not (SHIPPED_MODELS[name] / "model_index.json").exists():
            raise ValueError(f"model.name {name!r}: its weights are missing from {SHIPPED_MODELS[name]} "
                             f"(a partial checkout?); `python -m toyworld pretrain --world {name} --out runs/{name}` rebuilds "
                             f"them in runs/{name}/model: copy that folder there, or pass --set model.name=runs/{name}/model")
        return str(SHIPPED_MODELS[name])
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    looks_like_path = name.startswith(("/", ".", "~", "\\")) or name.count("/") > 1 or name.endswith("/") or ":" in name
    if looks_like_path:
        raise ValueError(f"model.name {name!r}: the folder does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not _in_hub_cache(name):
        raise ValueError(f"model.name {name!r}: no such folder, and as a hub id it needs the network (HF_HUB_OFFLINE is "
                         "set): pass a local diffusers folder, or download it once with the network on")
    return name


def check_vocabulary(model_name: str, initializers: dict[str, str]) -> None:
    """Each word's initializer (key -> word) must be one token of the model's tokenizer(s): checked
    when the config is built, from the tokenizer files of a shipped or local model folder. The
    tiny models (built on first use) and hub ids are checked when they load, before any writing."""
    from transformers import AutoTokenizer
    if model_name in TINY_LAYOUTS:
        return
    try:
        root = Path(resolve_model_path(model_name))
    except ValueError:
        return                                   # load_backbone names a missing model
    for folder in (root / "tokenizer", root / "tokenizer_2"):
        if not folder.is_dir():
            continue
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for key, word in initializers.items():
            count = len(tokenizer(word, add_special_tokens=False).input_ids)
            if count != 1:
                raise ValueError(f"{key}: {word!r} is {count} tokens in {folder}; the word a head starts from must "
                                 "be one token of the model's vocabulary (README: Adding a concept)")


def _in_hub_cache(repo_id: str) -> bool:
    """Offline, a hub id still loads from the local hub cache (downloaded before)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except Exception:               # a malformed id: not in the cache either
        return False


def load_backbone(name: str, image_encoder: str | None = None, need_image_encoder: bool = False,
                  revision: str | None = None) -> Backbone:
    """Load every component with from_pretrained and freeze it.

    The image encoder is loaded only when a head needs it: `image_encoder` (a folder or hub id of a
    CLIP vision model), else the model folder's own `image_encoder/` (the tiny model has one).
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    path = resolve_model_path(name)
    missing = [sub for sub in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if not Path(path, sub).is_dir()]
    if Path(path).exists() and missing:
        raise ValueError(f"{path}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/)")
    kw = {"revision": revision} if revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    except (OSError, ValueError) as err:       # hub id malformed, unknown, or unreachable
        if Path(path).exists():
            raise
        raise ValueError(f"model.name {name!r}: no such folder, and the hub could not provide it "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from err
    # fp32 like diffusers' modules, whatever the stored dtype (shipped weights are fp16); the
    # run's mixed precision is applied later.
    text_side = [(tokenizer, CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32, **kw))]
    if Path(path, "text_encoder_2").is_dir() or (not Path(path).exists() and _hub_has(path, "text_encoder_2", kw)):
        # SDXL (detected from the folder): the second encoder's pooled output conditions the UNet too.
        text_side.append((AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                          CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                      dtype=torch.float32, **kw)))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    encoder = None
    if not need_image_encoder:
        pass
    elif image_encoder is not None:
        encoder = FrozenImageEncoder(CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=torch.float32))
    elif Path(path, "image_encoder", "config.json").exists():
        encoder = FrozenImageEncoder(CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder", dtype=torch.float32))
    else:
        raise ValueError(f"model.image_encoder: a head uses the image encoder but {path} has no image_encoder/; "
                         "set model.image_encoder to a CLIP vision model folder or hub id")
    for module in (vae, unet, *[te for _, te in text_side]):
        module.requires_grad_(False).eval()
    if getattr(unet.config, "addition_embed_type", None) == "text_time" and len(text_side) != 2:
        raise ValueError(f"{path}: the UNet is SDXL's (addition_embed_type text_time) but there is no text_encoder_2/")
    return Backbone(path, text_side, vae, unet, scheduler, encoder)


def _hub_has(repo_id: str, subfolder: str, kw: dict) -> bool:
    """Does a hub model (not a local folder) list `subfolder` in its model_index.json?"""
    try:
        from huggingface_hub import hf_hub_download
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", **kw)).read_text())
        return subfolder in index
    except Exception:
        return False
