"""Evaluate runs: generate N samples per (reference object, prompt) with fixed seeds and score them."""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from guided_concepts import generate
from guided_concepts.concepts import CONCEPTS
from guided_concepts.evaluation.image_metrics import (ClipScorer, inspiration_tree_scores, load_callable,
                                                      mean_pairwise_distance, pixel_features, segment_plain_background,
                                                      silhouette_iou)
from guided_concepts.configs.schema import mask_set_options
from guided_concepts.metrics import attention_mask_metrics
from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
from guided_concepts.rundata import read_data_record, resolve_data_root, run_split
from guided_concepts.prompts import render_prompt
from guided_concepts.system import to_device
from guided_concepts.toyworld import truth
from guided_concepts.toyworld.truth import ground_truth_scores
from guided_concepts.prompts import prompts_for

# The seeds' prompts: base, two edits, and the words alone ("what did *s learn").
DEFAULT_PROMPTS = {
    "base": "a photo of a {category} {phrases}",
    "leopard": "a leopard-print {category} {phrases}",
    "red": "a red {category} {phrases}",
    "alone": "{words}",
}


@dataclass
class EvalSettings:
    prompts: dict = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    num_samples: int = 4
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 5.0
    objects: list | None = None           # object folders; default: the run's held-out objects
    features: str | None = None           # "module:function" images -> [N, F]
    segmenter: str | None = None          # "module:function" images -> masks
    clip: str | None = None               # CLIP path or hub id for editability
    device: str = "cpu"

    def __post_init__(self):             # refused before any run loads (generate() checks the same)
        generate.check_sampling(self.num_samples, self.steps, self.guidance_scale)


def held_out_objects(cfg, run_dir=None) -> list[Path]:
    """The run's held-out objects (as its data.json recorded them, when `run_dir` has one); with a
    single-object data set (nothing held out), that object."""
    root = resolve_data_root(cfg.data.root)
    records = scan_objects(root)
    if run_dir is not None and read_data_record(run_dir) is not None:
        return [r.root for r in run_split(records, cfg.data.holdout, root, run_dir)[1]] or [r.root for r in records]
    holdout = min(cfg.data.holdout, len(records) - 1)
    return [r.root for r in (records[len(records) - holdout:] if holdout > 0 else records)]


def prompt_text(system, template: str, category: str) -> str:
    words = " ".join(system.heads[n].config.token for n in system.tokens)
    clauses = {n: system.clauses[n] for n in system.tokens}
    return render_prompt(template.replace("{words}", words), category, clauses)


def class_word_prompt(system, prompt: str, category: str) -> str:
    """The prompt with each placeholder replaced by the class word (for CLIP-T)."""
    for n in system.tokens:
        prompt = prompt.replace(system.heads[n].config.token, category)
    return prompt


@torch.no_grad()
def evaluate_run(run_dir: str | Path, settings: EvalSettings, clip: ClipScorer | None = None) -> dict:
    """-> {"rows": [per object x prompt], "summary": {metric: mean}, "samples": {prompt_key: [3,H,W]},
    "notes": [...]}. Image metrics on a tiny random model only prove the machinery runs."""
    run_dir = Path(run_dir)
    system, cfg = generate.load_run(run_dir, device=settings.device)
    features_fn = load_callable(settings.features, pixel_features)
    segment_fn = load_callable(settings.segmenter, segment_plain_background)
    clip = clip or ClipScorer(settings.clip)
    notes = [] if clip.available else [f"editability (CLIP-T) skipped: {clip.reason}"]
    objects = [Path(o) for o in (settings.objects if settings.objects is not None else held_out_objects(cfg, run_dir))]
    if not objects:
        raise ValueError("no reference objects to evaluate (pass object folders)")
    rows, samples, token_features = [], {}, {}
    scorer = ground_truth_scorer(cfg)
    for obj in objects:
        records = scan_objects(obj)
        category = records[0].category
        truth = toyworld_truth(obj, scorer[0]) if scorer is not None else None
        sources = {n: obj for n in system.tokens}
        views = ObjectViewsDataset(records, cfg.data.resolution, flip_prob=0.0, **mask_set_options(cfg))
        reference_masks = torch.stack([views[i]["mask"] for i in range(len(views))])       # [V, 1, H, W]
        for key, template in settings.prompts.items():
            prompt = prompt_text(system, template, category)
            _, images, _ = generate.generate(system, cfg, prompt, sources, settings.num_samples, settings.seed,
                                             settings.steps, settings.guidance_scale)
            samples.setdefault(key, images[0])
            images = images.cpu()
            sil = silhouette_iou(segment_fn(images), reference_masks)
            feats = features_fn(images)
            row = {"run": run_dir.name, "object": obj.name, "prompt_key": key, "prompt": prompt,
                   "silhouette_iou": sil["centroid_iou"].mean().item(),
                   "silhouette_iou_max_view": sil["max_view_iou"].mean().item(),
                   "diversity": mean_pairwise_distance(feats)}
            if truth is not None:      # ToyWorld: attributes and silhouette against the true object
                camera_word = any(CONCEPTS[n].concept.reads_view_camera for n in system.tokens)
                camera_view = views[0] if camera_word else None
                row.update(ground_truth_scores(*scorer, images, truth, prompt,
                                               None if camera_view is None else camera_view["camera"].tolist(),
                                               None if camera_view is None else camera_view["mask"][0] > 0.5))
            if clip.available:
                texts = [class_word_prompt(system, prompt, category)] * len(images)
                row["clip_t"] = clip.text_image(images, texts).mean().item()
            rows.append(row)
        for n in system.tokens:     # each word alone, for the Inspiration-Tree token scores
            _, images, _ = generate.generate(system, cfg, f"a photo of {system.heads[n].config.token}", sources,
                                             settings.num_samples, settings.seed, settings.steps, settings.guidance_scale)
            token_features.setdefault(system.heads[n].config.token, []).append(features_fn(images))
        # Attention-mask IoU and pose error on the object's own views (meaningful on tiny models).
        batch = to_device(collate([views[i] for i in range(len(views))]), settings.device)
        prompts = prompts_for(batch["category"], cfg.prompt.templates[:1], system.clauses, system.tokens, random.Random(0),
                                     cfg.prompt.by_category)
        if system.attention_concepts:
            for name, value in attention_mask_metrics(system, batch, prompts, timestep=100).items():
                rows[-1].setdefault("_views", {})[name] = value.mean().item()
        for name, out in system.encode(batch).items():
            for metric, value in system.heads[name].validation_metrics(out, batch).items():
                rows[-1].setdefault("_views", {})[f"{name}/{metric}"] = value.median().item()
    view_metrics = {}
    for row in rows:
        for k, v in row.pop("_views", {}).items():
            view_metrics.setdefault(k, []).append(v)
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float))
    summary = {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}  # gt/colour: colour prompts only
    summary.update({f"attention/{k}" if "/iou" in k or "mass" in k else k: sum(v) / len(v) for k, v in view_metrics.items()})
    summary.update(inspiration_tree_scores({t: torch.cat(f) for t, f in token_features.items()}))
    return {"run": run_dir.name, "backbone": cfg.model.name, "rows": rows, "summary": summary,
            "samples": samples, "notes": notes}


def ground_truth_scorer(cfg):
    """(WorldTruth, scorer) when the run's backbone ships a ToyWorld scorer (scorer/), else None."""
    from guided_concepts.backbone.load import resolve_model_path
    return truth.ground_truth_scorer(resolve_model_path(cfg.model.name))


def toyworld_truth(obj: Path, world):
    """The object's ground truth in the scorer's world (meta.json shape.<world>), or None for other data."""
    meta_path = Path(obj) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    try:
        found = truth.truth_for(meta)
    except ValueError:
        return None
    return found.truth_of(meta) if found == world else None


def write_results(results: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """rows.csv (every object x prompt of every run) and results.json (rows + summaries)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in r["rows"]]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out_dir / "rows.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "samples"} for r in results], indent=1))
    return csv_path, json_path


