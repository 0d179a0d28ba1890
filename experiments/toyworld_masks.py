"""The seeds' experiment with ground truth: does the mask loss make `*s` carry the chair's shape?

On ToyWorld, train shape + pose with the mask cross-attention loss at each weight (the seeds:
0 vs 0.1), then for every held-out chair: encode `*s` from its masks, generate
"a {colour} chair in the shape of *s with pose *p" at several cameras (`*p` from the camera) and
colours, and compare each sample's silhouette with the same chair's true render at that camera.

    python -m experiments.toyworld_masks --out runs/toyworld_masks             # ~15 min on 2 cores

Rows besides each weight: "no *s" (the same run's prompt without the shape word: what pose and
the class word alone give), "true arms and back in words" (the chair's attributes written in the
prompt instead of *s: what the shape word would have to carry) and "other chair" (the true
render of another held-out chair at the same camera: the IoU any chair would get). The scorer also reads arms and back height (carried
by `*s`), the direction (carried by `*p`) and the colour (asked for in words) from each sample.
Writes results.json and table.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.toyworld.scorer import mask_iou
from guided_concepts.toyworld.truth import truth_of_folder
from guided_concepts.toyworld.world import direction_bin

TARGET_CAMERAS = ((0.0, 20.0), (90.0, 20.0), (180.0, 20.0), (-90.0, 20.0), (45.0, 30.0), (-135.0, 10.0))
COLOURS = (None, "red", "blue")


def train_runs(out: Path, weights, variant: str, steps: int, overwrite: bool, extra: list[str], config: Path) -> dict:
    runs = {}
    for weight in weights:
        name = f"mask_{weight:g}"
        runs[weight] = out / name
        if (runs[weight] / "checkpoints").exists() and not overwrite and any((runs[weight] / "checkpoints").iterdir()):
            print(f"{name}: reusing the trained run in {runs[weight]}")
            continue
        train.main(["--config", str(config), "--tokens", "shape,pose", "--name", name,
                    "--set", f"run.output_dir={out}", "--set", f"train.steps={steps}",
                    "--set", "train.sample_every=0", "--set", f"losses.shape.mask_weight={weight}",
                    "--set", f"losses.shape.mask_variant={variant}", *extra] + (["--overwrite"] if overwrite else []))
    return runs


@torch.no_grad()
def score_run(run: Path, loaded: tuple, objects: list[Path], scorer, samples: int, steps: int, guidance: float,
              shape: str = "word", colours=COLOURS) -> dict:
    """shape: how the prompt gives the shape: "word" (*s from the object's masks), "none", or
    "attributes" (the true shape in words: what *s would have to carry)."""
    system, cfg = loaded             # generate.load_run(run)
    resolution = cfg.data.resolution
    ious, hits = [], {"direction": [], "colour": []}
    grid = []
    for o, folder in enumerate(objects):
        world, truth = truth_of_folder(folder)
        for c, (azimuth, elevation) in enumerate(TARGET_CAMERAS):
            _, true_mask = world.render(truth, azimuth, elevation, 2.5, resolution)
            for colour in colours:
                words = f"a {colour + ' ' if colour else ''}{world.noun(truth)}"
                shape_words = {"word": system.clauses["shape"], "none": "", "attributes": world.shape_words(truth)}[shape]
                prompt = " ".join(filter(None, [words, shape_words, system.clauses["pose"]]))
                sources = {"shape": folder, "pose": {"azimuth": azimuth, "elevation": elevation, "distance": 2.5}}
                _, images, _ = generate.generate(system, cfg, prompt, sources, samples, seed=100 * o + 10 * c,
                                                 steps=steps, guidance_scale=guidance)
                ious += mask_iou(world.silhouette(scorer, images),
                                 torch.from_numpy(true_mask)[None].expand(len(images), -1, -1)).tolist()
                read = world.read(scorer, images)
                for factor in world.shape_factors:
                    hits.setdefault(factor, []).extend(world.flags(factor, read[factor], truth))
                hits["direction"] += [d == direction_bin(azimuth) for d in read["direction"]]
                if colour:
                    hits["colour"] += [v == colour for v in read["colour"]]
                if colour is None and o < 4:
                    grid.append(images[0])
    result = {"silhouette_iou": float(np.mean(ious)), "silhouette_iou_std_err": float(np.std(ious) / np.sqrt(len(ious))),
              **{f"{k}_accuracy": float(np.mean(v)) for k, v in hits.items() if v}, "samples": len(ious)}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val/' in line]
    if metrics:
        result.update({k: v for k, v in metrics[-1].items() if k.startswith("val/") and "shape" in k})
    return result, torch.stack(grid)


@torch.no_grad()
def shape_word_effect(loaded: tuple, objects: list[Path], steps: int, guidance: float) -> float:
    """How much swapping *s for another chair's changes a sample, relative to changing the seed:
    mean |x(*s of o, seed) - x(*s of o+1, seed)| / mean |x(*s of o, seed) - x(*s of o, seed+1)|,
    same prompt and pose. 0 = the word is ignored; about 1 = it matters as much as the noise."""
    system, cfg = loaded             # generate.load_run(run)
    swap, reseed = [], []
    for o, folder in enumerate(objects):
        world, truth = truth_of_folder(folder)
        prompt = f"a {world.noun(truth)} {system.clauses['shape']} {system.clauses['pose']}"
        for c, (azimuth, elevation) in enumerate(TARGET_CAMERAS[:3]):
            pose = {"azimuth": azimuth, "elevation": elevation, "distance": 2.5}

            def sample(shape_from, seed):
                return generate.generate(system, cfg, prompt, {"shape": shape_from, "pose": pose}, 1, seed=seed,
                                         steps=steps, guidance_scale=guidance)[1]
            base = sample(folder, 7 * o + c)
            swap.append((base - sample(objects[(o + 1) % len(objects)], 7 * o + c)).abs().mean().item())
            reseed.append((base - sample(folder, 7 * o + c + 1000)).abs().mean().item())
    return float(np.mean(swap) / np.mean(reseed))


def other_chair_iou(objects: list[Path], resolution: int) -> float:
    """IoU of each held-out object's true render with the others' at the same camera."""
    truths = [truth_of_folder(f) for f in objects]
    values = []
    for azimuth, elevation in TARGET_CAMERAS:
        masks = [torch.from_numpy(world.render(t, azimuth, elevation, 2.5, resolution)[1]) for world, t in truths]
        for i in range(len(masks)):
            for j in range(len(masks)):
                if i != j:
                    values.append(float(mask_iou(masks[i][None], masks[j][None])))
    return float(np.mean(values))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/toyworld_masks"))
    p.add_argument("--weights", default="0,0.1", help="mask-loss weights, comma separated")
    p.add_argument("--variant", default="mse_maxnorm", help="losses.shape.mask_variant (the seeds': mse_maxnorm)")
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--samples", type=int, default=2, help="samples per (chair, camera, colour)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--overwrite", action="store_true", help="retrain runs that exist")
    p.add_argument("--set", action="append", default=[], help="extra train.py --set for every run")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "base.yaml",
                   help="the runs' config (configs/toyworld2.yaml: ToyWorld 2)")
    p.add_argument("--quick", action="store_true", help="no colour words, for a fast look (colour_accuracy absent)")
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    extra = [x for item in args.set for x in ("--set", item)]
    runs = train_runs(args.out, weights, args.variant, args.steps, args.overwrite, extra, args.config)
    first = runs[weights[0]]
    loaded = {weight: generate.load_run(run) for weight, run in runs.items()}   # (system, cfg), once per run
    cfg = loaded[weights[0]][1]
    objects = held_out_objects(cfg, first)
    world = truth_of_folder(objects[0])[0]
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    table, grids = {}, []
    colours = (None,) if args.quick else COLOURS
    score = dict(objects=objects, scorer=scorer, samples=args.samples, steps=args.sample_steps,
                 guidance=args.guidance_scale, colours=colours)
    for weight, run in runs.items():
        row = f"mask weight {weight:g}"
        table[row], grid = score_run(run, loaded[weight], **score)
        table[row]["shape_word_effect"] = shape_word_effect(loaded[weight], objects, args.sample_steps,
                                                            args.guidance_scale)
        grids.append(grid)
    for row, shape in (("no *s (weight 0 run)", "none"), ("the true shape in words (weight 0 run)", "attributes")):
        table[row], grid = score_run(first, loaded[weights[0]], shape=shape, **score)
        grids.append(grid)
    table["other chair's true render"] = {"silhouette_iou": other_chair_iou(objects, cfg.data.resolution)}
    result = {"variant": args.variant, "steps": args.steps, "held_out_objects": [o.name for o in objects],
              "cameras": TARGET_CAMERAS, "colours": COLOURS, "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.md").write_text(markdown_table(table, args.variant, world))
    from guided_concepts.toyworld.evaluate import save_grid
    save_grid(torch.cat(grids), len(TARGET_CAMERAS), args.out / "samples.png", scale=3)
    print(markdown_table(table, args.variant, world))
    return result


def markdown_table(table: dict, variant: str, world) -> str:
    columns = ["silhouette_iou", *(f"{f}_accuracy" for f in world.binary_factors), "direction_accuracy", "colour_accuracy",
               "shape_word_effect", "val/shape/mass_inside@t100", "val/shape/iou@t100"]
    lines = [f"| row ({variant}) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        cells = [f"{row[c]:.3f}" + (f" ± {row['silhouette_iou_std_err']:.3f}" if c == "silhouette_iou" and
                                     "silhouette_iou_std_err" in row else "") if c in row else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
