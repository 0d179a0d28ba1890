"""Multi-view shape sets and the diversity knob, measured on the synthetic chairs.

Trains (or reuses) four shape runs, then writes shape_diversity.json and shape_diversity.png:

- view invariance: within-object ÷ between-object variance of *s, set encoder vs single-view head
  (the set encoder is given random subsets of 1..V views, so its within-object spread is real);
- trade-off as tau goes 0 -> 2: spread of sampled *s, mean pairwise distance of the UNet's
  denoised predictions for one noisy input, and IoU of *s's attention with the reference mask;
- alignment: cosine between the mask branch's and the image branch's code on held-out objects,
  with and without the alignment loss.

The tiny model's weights are random, so its images mean nothing; these measurements do. With
--model <real SD> the same script runs on real weights.

    python -m experiments.shape_diversity --steps 300 --out runs/shape_diversity
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.losses import attention_iou
from guided_concepts.metrics import variance_ratio
from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
from guided_concepts.rundata import resolve_data_root
from guided_concepts.prompts import prompts_for

TAUS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def split_records(cfg):
    records = scan_objects(resolve_data_root(cfg.data.root))
    holdout = min(cfg.data.holdout, len(records) - 1)
    return records[:len(records) - holdout], records[len(records) - holdout:]


def all_views(records, cfg, random_sets: bool, seed: int = 0):
    data = ObjectViewsDataset(records, cfg.data.resolution, flip_prob=0.0, seed=seed,
                              mask_set_size=cfg.concepts["shape"].max_views, random_set_size=random_sets)
    return collate([data[i] for i in range(len(data))])


@torch.no_grad()
def view_invariance(run_dir: Path) -> dict:
    system, cfg = generate.load_run(run_dir)
    out = {}
    train_records, held = split_records(cfg)
    # Held-out alone has too few objects for a between-object variance: report train and all.
    for split, records in (("train", train_records), ("all_objects", train_records + held)):
        batch = all_views(records, cfg, random_sets=True)
        embeds = system.heads["shape"].encode(batch).embeds
        out[f"{split}/shape_view_over_object_variance"] = variance_ratio(embeds, batch["object_index"])
    return out


@torch.no_grad()
def tradeoff(run_dir: Path, samples: int, timestep_pred: int = 500, timestep_attn: int = 100) -> dict:
    system, cfg = generate.load_run(run_dir)
    backbone, concept = system.backbone, system.heads["shape"]
    _, held = split_records(cfg)
    batch = all_views(held, cfg, random_sets=False)
    device = next(backbone.unet.parameters()).device
    latents = backbone.vae.encode(batch["image"].to(device)).latent_dist.mode() * backbone.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    prompts = prompts_for(batch["category"], cfg.prompt.templates[:1], system.clauses, ["shape"], __import__("random").Random(0))
    results = {"tau": list(TAUS), "embedding_spread": [], "prediction_distance": [], "attention_iou": []}
    for tau in TAUS:
        concept.diversity = tau
        embeds, preds, ious = [], [], []
        for s in range(samples):
            concept.noise_generator = torch.Generator().manual_seed(1000 + s)
            encoded = {"shape": concept.encode(batch)}
            embeds.append(encoded["shape"].embeds)
            text, selection = system.text_conditioning(prompts, encoded)[:2]
            t = torch.full((len(latents),), timestep_pred, dtype=torch.long)
            pred, _ = system.unet_with_attention(backbone.scheduler.add_noise(latents, noise, t), t, text, selection)
            preds.append(pred)
            t = torch.full((len(latents),), timestep_attn, dtype=torch.long)
            _, maps = system.unet_with_attention(backbone.scheduler.add_noise(latents, noise, t), t, text, selection)
            ious.append(attention_iou(maps[:, 0], batch["mask"]).mean().item())
        system.store.end()
        embeds, preds = torch.stack(embeds), torch.stack(preds)           # [S, B, ...]
        results["embedding_spread"].append(embeds.var(0).mean().item())
        pairs = [(preds[i] - preds[j]).flatten(1).norm(dim=1).mean().item()
                 for i, j in itertools.combinations(range(samples), 2)]
        results["prediction_distance"].append(sum(pairs) / len(pairs))
        results["attention_iou"].append(sum(ious) / len(ious))
    return results


@torch.no_grad()
def alignment(run_dir: Path) -> float:
    system, cfg = generate.load_run(run_dir)
    _, held = split_records(cfg)
    out = system.heads["shape"].encode(all_views(held, cfg, random_sets=False))
    return F.cosine_similarity(out.extras["mu"], out.extras["image_code"], dim=-1).mean().item()


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = results["tradeoff"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, label in zip(axes[:3], ("embedding_spread", "prediction_distance", "attention_iou"),
                              ("spread of sampled *s", "pairwise distance of denoised predictions",
                               "IoU of *s attention with the mask (t=100)")):
        ax.plot(curve["tau"], curve[key], "o-")
        ax.set_xlabel("diversity tau")
        ax.set_title(label, fontsize=9)
    inv = results["view_invariance"]
    names = list(inv)
    axes[3].bar(names, [inv[n]["all_objects/shape_view_over_object_variance"] for n in names])
    axes[3].set_title("*s within ÷ between object variance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=8, help="draws of *s per tau")
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default="runs/shape_diversity")
    p.add_argument("--overwrite", action="store_true")
    args, extra = p.parse_known_args(argv)
    variants = {
        "set_encoder": [],
        "single_view_head": ["--set", "concepts.shape.encoder=view"],
        "image_aligned": ["--set", "concepts.shape.use_image=true"],
        "image_not_aligned": ["--set", "concepts.shape.use_image=true", "--set", "losses.shape.align_weight=0"],
    }
    runs = {}
    for name, flags in variants.items():
        runs[name] = Path(args.out) / name
        if args.overwrite or not (runs[name] / "checkpoints").is_dir():
            train.main(["--tokens", "shape", "--model", args.model, "--name", name, "--set", f"run.output_dir={args.out}",
                        "--set", f"train.steps={args.steps}", "--set", "train.sample_every=0", *flags, *extra]
                       + (["--overwrite"] if args.overwrite else []))
    results = {
        "view_invariance": {n: view_invariance(runs[n]) for n in ("set_encoder", "single_view_head")},
        "tradeoff": tradeoff(runs["set_encoder"], args.samples),
        "alignment_cosine_held_out": {n: alignment(runs[n]) for n in ("image_aligned", "image_not_aligned")},
    }
    Path(args.out, "shape_diversity.json").write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out) / "shape_diversity.png")
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
