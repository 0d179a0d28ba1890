"""The seeds' open questions, measured on generations: with a shape word that carries the shape,
what does the mask cross-attention loss buy, and what does it cost? And what does the diversity
knob (the shape code's spread at generation) trade?

For each mask-loss weight (the seeds' mse_maxnorm variant) a shape run is trained on ToyWorld
(configs/base.yaml otherwise), then for every held-out chair "a {—, red, blue} chair in the shape of
*s" is sampled with several seeds and read back:

- fidelity: arms and back match the chair (scorer); silhouette IoU against the chair's own true
  renders minus against the other held-out chairs' (best over the 8 directions, since no pose word
  fixes the camera): > 0 means the silhouette is this chair's rather than any chair's;
- editability: the colour asked for in words is the colour drawn (red / blue prompts);
- diversity: mean pairwise 1 - IoU between the silhouettes of one chair's samples (seeds).

The diversity curve does the same on the weight-0 run with tau = 0, 0.5, 1, 2, 4
(generate.generate(..., diversity=tau)).

    python -m experiments.seeds_tradeoff --out runs/seeds_tradeoff        # ~20 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from guided_concepts import generate
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.experiments.swap_matrix import (encode_word, held_out_objects, proportion, sample_batch, true_mask,
                                                     truth_of, world_of)
from guided_concepts.system import render_prompt
from guided_concepts.toyworld.scorer import mask_iou
from guided_concepts.toyworld.world import direction_azimuth

COLOURS = (None, "red", "blue")


def train_run(out: Path, weight: float, steps: int, extra: list[str], config: Path) -> Path:
    from guided_concepts import train
    run = out / f"mask_{weight:g}"
    if (run / "checkpoints").exists() and any((run / "checkpoints").iterdir()):
        return run
    train.main(["--config", str(config), "--tokens", "shape",
                "--name", run.name, "--set", f"run.output_dir={out}", "--set", f"train.steps={steps}",
                "--set", "train.sample_every=0", "--set", f"losses.shape.mask_weight={weight}",
                "--set", "losses.shape.mask_variant=mse_maxnorm", *extra])
    return run


def silhouette_fidelity(world, shapes: torch.Tensor, own: int, truths, resolution: int) -> torch.Tensor:
    """[N] IoU with the own object's best-matching render minus the mean over the others'."""
    def best(chair):
        renders = torch.stack([true_mask(world, chair, direction_azimuth(d), resolution) for d in range(8)])   # [8, H, W]
        return torch.stack([mask_iou(shapes, r[None].expand_as(shapes)) for r in renders]).amax(0)    # [N]
    others = torch.stack([best(t) for i, t in enumerate(truths) if i != own]).mean(0)
    return best(truths[own]) - others


def diversity(shapes: torch.Tensor) -> float:
    """Mean pairwise 1 - IoU among one chair's samples."""
    n = len(shapes)
    values = [1 - float(mask_iou(shapes[i:i + 1], shapes[j:j + 1])) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(values)) if values else 0.0


@torch.no_grad()
def score(system, cfg, seeds: int, steps: int, guidance: float, scorer, tau: float = 0.0) -> dict:
    objects = held_out_objects(cfg)
    truths = [truth_of(f) for f in objects]
    world = world_of(objects)
    hits = {**{f: [] for f in world.shape_factors}, "colour": []}
    fidelity, spread = [], []
    for o, folder in enumerate(objects):
        noun = world.noun(truths[o])
        for colour in COLOURS:
            prompt = render_prompt("a {category} {phrases}", f"{colour} {noun}" if colour else noun,
                                   {"shape": system.clause("shape")})
            if tau == 0:
                word = encode_word(system, cfg, "shape", folder)
                images = sample_batch(system, [prompt] * seeds, {"shape": word[None].expand(seeds, -1, -1)},
                                      seed=3000 + 10 * o, steps=steps, guidance=guidance)
            else:       # each sample draws its own code
                images = generate.generate(system, cfg, prompt, {"shape": folder}, seeds, seed=3000 + 10 * o,
                                           steps=steps, guidance_scale=guidance, diversity=tau)[1]
            read = world.read(scorer, images)
            shapes = world.silhouette(scorer, images)
            if colour is None:
                for factor in world.shape_factors:
                    hits[factor] += world.flags(factor, read[factor], truths[o])
                fidelity += silhouette_fidelity(world, shapes, o, truths, cfg.data.resolution).tolist()
                spread.append(diversity(shapes))
            else:
                hits["colour"] += [c == colour for c in read["colour"]]
    out = {}
    for k, v in hits.items():
        if not v:             # nothing judgeable (e.g. a coarse word on its threshold for every object)
            continue
        rate = proportion(v, "p")
        out[k], out[f"{k}_se"] = rate["p"], rate["se"]
    out["silhouette_own_minus_other"] = float(np.mean(fidelity))
    out["silhouette_own_minus_other_se"] = float(np.std(fidelity) / np.sqrt(len(fidelity)))
    out["diversity"] = float(np.mean(spread))
    out["samples_per_cell"] = len(fidelity)
    return out


def table(rows: dict, key: str, factors) -> str:
    columns = (*factors, "silhouette_own_minus_other", "colour", "diversity")
    lines = [f"| {key} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" + (f" ± {row[c + '_se']:.3f}" if c + "_se" in row else "") if c in row else "–"
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/seeds_tradeoff"))
    p.add_argument("--weights", default="0,0.01,0.1,0.3,1.0")
    p.add_argument("--taus", default="0,0.5,1,2,4")
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--seeds", type=int, default=6, help="samples per (chair, prompt)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--set", action="append", default=[], help="extra train.py --set for every run")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "base.yaml",
                   help="the runs' config (configs/toyworld2.yaml: ToyWorld 2)")
    args = p.parse_args(argv)
    extra = [x for item in args.set for x in ("--set", item)]
    weights = [float(w) for w in args.weights.split(",")]
    started = time.time()
    runs = {w: train_run(args.out, w, args.steps, extra, args.config) for w in weights}
    scorer = world = None
    rows, curve = {}, {}
    for w, run in runs.items():
        system, cfg = generate.load_run(run)
        world = world or world_of(held_out_objects(cfg))
        scorer = scorer or world.load_scorer(resolve_model_path(cfg.model.name))
        rows[f"mask weight {w:g}"] = score(system, cfg, args.seeds, args.sample_steps, args.guidance_scale, scorer)
        print(f"mask weight {w:g}: {rows[f'mask weight {w:g}']}", flush=True)
        if w == weights[0]:
            for tau in (float(t) for t in args.taus.split(",")):
                curve[f"tau {tau:g}"] = score(system, cfg, args.seeds, args.sample_steps, args.guidance_scale, scorer, tau)
                print(f"tau {tau:g}: {curve[f'tau {tau:g}']}", flush=True)
    result = {"steps": args.steps, "seeds": args.seeds, "mask_variant": "mse_maxnorm", "weights": rows,
              "diversity_curve_on": f"mask weight {weights[0]:g}", "diversity_curve": curve,
              "seconds": round(time.time() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(rows, "mask weight", world.binary_factors) + "\n" + table(curve, "diversity tau", world.binary_factors)
    (args.out / "table.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
