"""Score a ToyWorld base model with ground truth: generate from attribute captions, read the
attributes back with the scorer, compare.

Held-out prompts name (colour, arms, back) combinations that never appeared together in
pretraining (world.HELD_OUT_COMBOS), at each of the 8 viewing directions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from guided_concepts.toyworld.scorer import load_scorer, silhouette
from guided_concepts.toyworld.world import ATTRIBUTES, DIRECTIONS, HELD_OUT_COMBOS, caption

CHANCE = {name: round(1 / n, 4) for name, n in ATTRIBUTES.items()}
SEEN_COMBOS = ((5, 0, 0), (4, 1, 1), (3, 1, 0), (0, 0, 1))   # in pretraining, for comparison


def load_pipeline(model_dir: str | Path, device: str = "cpu"):
    import diffusers
    from diffusers import StableDiffusionPipeline
    diffusers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 4.0,
             batch: int = 64) -> torch.Tensor:
    """-> images [N,3,H,W] in [0,1], one per (prompt, seed) pair, in order."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk, chunk_seeds = prompts[start:start + batch], seeds[start:start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        out.append(pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                        generator=generators, output_type="pt").images.float().cpu())
    return torch.cat(out)


def attribute_prompts(combos, seeds: int):
    """(colour, arms, back) combos x 8 directions x seeds -> (prompts, seeds, labels [N,4])."""
    prompts, seed_list, labels = [], [], []
    for c, (colour, arms, back) in enumerate(combos):
        for direction in range(len(DIRECTIONS)):
            for s in range(seeds):
                prompts.append(caption(colour, arms, back, direction))
                seed_list.append(1000 * c + 10 * direction + s)
                labels.append((colour, arms, back, direction))
    return prompts, seed_list, np.array(labels)


def score(scorer, images: torch.Tensor, labels: np.ndarray) -> dict:
    """Attribute accuracy of images against the labels they were asked for."""
    predicted = scorer.predict(images)
    return {name: round(float((predicted[name].numpy() == labels[:, i]).mean()), 4)
            for i, name in enumerate(ATTRIBUTES)}


def evaluate_base_model(model_dir: str | Path, seeds: int = 2, steps: int = 20, guidance_scale: float = 4.0,
                        grid: str | Path | None = None) -> dict:
    pipe = load_pipeline(model_dir)
    scorer = load_scorer(Path(model_dir) / "scorer")
    metrics = {"chance": CHANCE, "guidance_scale": guidance_scale, "sample_steps": steps}
    for split, combos in (("held_out", HELD_OUT_COMBOS), ("seen", SEEN_COMBOS)):
        prompts, seed_list, labels = attribute_prompts(combos, seeds)
        images = generate(pipe, prompts, seed_list, steps, guidance_scale)
        metrics[f"{split}_accuracy"] = score(scorer, images, labels)
        area = silhouette(images).flatten(1).float().mean(1)
        metrics[f"{split}_object_area"] = round(float(area.mean()), 4)
        if split == "held_out" and grid is not None:
            save_grid(images[::seeds], len(DIRECTIONS), grid)
    metrics["held_out_prompts"] = [caption(*combo) for combo in HELD_OUT_COMBOS]
    return metrics


def save_grid(images: torch.Tensor, columns: int, path: str | Path, scale: int = 2) -> None:
    """images [N,3,H,W] in [0,1] -> a PNG grid with `columns` per row (nearest-neighbour upscaled)."""
    from PIL import Image
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)
