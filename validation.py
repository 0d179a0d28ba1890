"""Validation during training and the token export at its end: sample grids with attention
overlays, held-out metrics, per-object token files. Used by train.py; no accelerate here."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from guided_concepts.metrics import attention_mask_metrics
from guided_concepts.objectdata import ObjectViewsDataset, collate
from guided_concepts.overlays import attention_grid
from guided_concepts.system import to_device
from guided_concepts.tokens.export import save_word
from guided_concepts.prompts import prompts_for
from guided_concepts import sampling


def first_views(dataset, count: int) -> dict:
    """One batch with the first view of up to `count` objects."""
    n = len(dataset.records)
    return collate([dataset[dataset.views_of(i)[0]] for i in range(min(count, n))])


def validate(system, cfg, val, step: int, run_dir: Path, device) -> dict:
    batch = to_device(first_views(val, cfg.sample.num_objects), device)
    prompts = prompts_for(batch["category"], cfg.prompt.templates[:1], system.clauses, system.tokens, random.Random(0), cfg.prompt.by_category)
    images, maps = sampling.sample(system, prompts, batch, cfg.sample.steps, cfg.sample.guidance_scale, cfg.sample.seed)
    reference_maps = None
    if system.attention_concepts:
        _, reference_maps = attention_mask_metrics(system, batch, prompts, timestep=100, return_maps=True)
    parts: dict[str, list] = {}
    for start in range(0, len(val), cfg.train.batch_size):       # chunks: held-out sets can be large
        views = to_device(collate([val[i] for i in range(start, min(start + cfg.train.batch_size, len(val)))]), device)
        found = {}
        if system.attention_concepts:
            view_prompts = prompts_for(views["category"], cfg.prompt.templates[:1], system.clauses, system.tokens, random.Random(0),
                                              cfg.prompt.by_category)
            found = {f"{k}@t100": v for k, v in attention_mask_metrics(system, views, view_prompts, 100).items()}
        with torch.no_grad():
            for name, out in system.encode(views).items():
                found.update({f"{name}/{k}": v.cpu() for k, v in system.heads[name].validation_metrics(out, views).items()})
        for k, v in found.items():
            parts.setdefault(k, []).append(v)
    found = {k: torch.cat(v) for k, v in parts.items()}
    names = [system.heads[n].config.token for n in system.attention_concepts]
    references = (batch["image"].float().cpu() + 1) / 2
    attention_grid(references, images, maps, names, reference_maps).save(run_dir / "samples" / f"step_{step:06d}.png")
    # Errors as medians (robust to a few flipped poses), everything else as means.
    return {f"val/{k}": (v.median() if "error" in k else v.mean()).item() for k, v in found.items()}


EXPORT_BATCH = 64        # objects encoded at once at the end of a run: memory bounded, not growing with the data


def export_tokens(system, datasets, run_dir: Path, device, batch_size: int = EXPORT_BATCH):
    """tokens/<object>/<concept>.safetensors (first view, all masks, mean code), loadable by
    diffusers' load_textual_inversion (SDXL: the clip_l/clip_g file, once per encoder).
    Objects are read and encoded `batch_size` at a time (eval mode: each word is its object's
    alone, so the files do not depend on it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    system.heads.eval()
    for data in datasets:
        dataset = ObjectViewsDataset(data.records, data.resolution, flip_prob=0.0, mask_set_size=data.mask_set_size,
                                     mask_set_resolution=data.mask_set_resolution, set_shading=data.set_shading,
                                     cache_bytes=0)     # each object is read once: keeping it only grows memory
        count = len(dataset.records)
        for start in range(0, count, batch_size):
            views = [dataset[dataset.views_of(i)[0]] for i in range(start, min(start + batch_size, count))]
            batch = to_device(collate(views), device)
            with torch.no_grad():
                encoded = system.encode(batch)
            for name, out in encoded.items():
                for b, obj in enumerate(batch["object_name"]):
                    save_word(run_dir / "tokens" / obj / f"{name}.safetensors", system.heads[name].config.token,
                              out.embeds[b], system.table.embedding_dims)
