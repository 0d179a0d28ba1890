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

Complexity versus diversity (the notes' other question; ToyWorld 2): --backgrounds plain,floor,clutter
trains every weight on the same objects on white, on a floor and among blocks
(data.root toyworld2 / toyworld2-floor / toyworld2-clutter), and --cross-category also samples
"a {B} in the shape of *s" for every other category B: the same scores against B rendered with the
object's shape ("cross_" keys), the category kept, and the spread of the scorer's six shape
readings across seeds ("shape_spread", a second diversity measure beside the silhouettes').
--fit scores every run after HyperDreamBooth's regression phase (tune.py --targets, then --fit), so
the shape word whose diversity is measured is one that carries the shape.

    python -m experiments.seeds_tradeoff --out runs/seeds_tradeoff        # ~20 min on 2 cores
    python -m experiments.seeds_tradeoff --config configs/toyworld2.yaml --backgrounds plain,floor,clutter \
        --weights 0,0.1,1.0 --cross-category --out runs/complexity
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
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.toyworld.probes import encode_word, proportion, sample_batch, true_mask, truth_of, world_of
from guided_concepts.prompts import render_prompt
from guided_concepts.toyworld.scorer import mask_iou
from guided_concepts.toyworld.world import direction_azimuth

COLOURS = (None, "red", "blue")
BACKGROUND_ROOTS = {"plain": "toyworld2", "floor": "toyworld2-floor", "clutter": "toyworld2-clutter"}


def fitted(run: Path) -> Path:
    """HyperDreamBooth's regression phase on a run (tune.py --targets, then --fit): <run>_fit,
    kept when it exists."""
    from guided_concepts import tune
    out = run.with_name(run.name + "_fit")
    if not (out / "config.yaml").exists():
        targets = run / "word_targets.safetensors"
        if not targets.exists():
            tune.tune_targets(run, targets, progress=lambda line: None)
        tune.fit_heads_to_targets(run, targets, out)
    return out


def train_run(out: Path, weight: float, steps: int, extra: list[str], config: Path, background: str | None = None) -> Path:
    from guided_concepts import train
    run = out / (f"{background}_mask_{weight:g}" if background else f"mask_{weight:g}")
    if background:
        extra = [*extra, "--set", f"data.root={BACKGROUND_ROOTS[background]}"]
    if (run / "checkpoints").exists() and any((run / "checkpoints").iterdir()):
        return run
    train.main(["--config", str(config), "--tokens", "shape",
                "--name", run.name, "--set", f"run.output_dir={out}", "--set", f"train.steps={steps}",
                "--set", "train.sample_every=0", "--set", f"losses.shape.mask_weight={weight}",
                "--set", "losses.shape.mask_variant=mse_maxnorm", *extra])
    return run


def silhouette_fidelity(world, shapes: torch.Tensor, own: int, truths, resolution: int) -> torch.Tensor:
    """[N] IoU with the own object's best-matching render minus the mean over the others'
    (truths: what each object's word should draw, e.g. another category with its shape)."""
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


def shape_spread(read: dict, world) -> float:
    """The spread of the scorer's continuous shape readings across one object's samples: the mean
    over parameters of their standard deviation (nan when the world reads none: ToyWorld 1)."""
    values = [np.std(read[f]) for f in world.shape_factors if isinstance(read[f][0], float)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def score(system, cfg, seeds: int, steps: int, guidance: float, scorer, tau: float = 0.0,
          cross_category: bool = False) -> dict:
    """cross_category: also "a {B} in the shape of *s" for every other category B among the held-out
    objects, scored against B rendered with the object's shape ("cross_" keys)."""
    objects = held_out_objects(cfg)
    truths = [truth_of(f) for f in objects]
    world = world_of(objects)
    recipients = {world.noun(t): t for t in truths}            # one object of each category (its noun)
    hits = {**{f: [] for f in world.shape_factors}, "colour": [], "category_kept": []}
    fidelity, spread, readings = [], [], []
    cross = {"hits": {f: [] for f in world.shape_factors}, "fidelity": [], "spread": [], "readings": [], "kept": []}
    for o, folder in enumerate(objects):
        noun = world.noun(truths[o])
        others = [n for n in recipients if n != noun] if cross_category else []
        for colour, target in [(c, noun) for c in COLOURS] + [(None, n) for n in others]:
            prompt = render_prompt("a {category} {phrases}", f"{colour} {target}" if colour else target,
                                   {"shape": system.clauses["shape"]})
            if tau == 0:
                word = encode_word(system, cfg, "shape", folder)
                images = sample_batch(system, [prompt] * seeds, {"shape": word[None].expand(seeds, -1, -1)},
                                      seed=3000 + 10 * o, steps=steps, guidance=guidance)
            else:       # each sample draws its own code
                images = generate.generate(system, cfg, prompt, {"shape": folder}, seeds, seed=3000 + 10 * o,
                                           steps=steps, guidance_scale=guidance, diversity=tau)[1]
            read = world.read(scorer, images)
            shapes = world.silhouette(scorer, images)
            kept = [c == target for c in read["category"]] if "category" in read else []
            if colour is None and target == noun:
                for factor in world.shape_factors:
                    hits[factor] += world.flags(factor, read[factor], truths[o])
                fidelity += silhouette_fidelity(world, shapes, o, truths, cfg.data.resolution).tolist()
                spread.append(diversity(shapes))
                readings.append(shape_spread(read, world))
                hits["category_kept"] += kept
            elif colour is None:          # another category with this object's shape
                for factor in world.shape_factors:
                    cross["hits"][factor] += world.flags(factor, read[factor], truths[o])
                as_target = [world.with_shape_of(recipients[target], t) for t in truths]
                cross["fidelity"] += silhouette_fidelity(world, shapes, o, as_target, cfg.data.resolution).tolist()
                cross["spread"].append(diversity(shapes))
                cross["readings"].append(shape_spread(read, world))
                cross["kept"] += kept
            else:
                hits["colour"] += [c == colour for c in read["colour"]]
    out = {}
    for prefix, rates in (("", hits), ("cross_", {**cross["hits"], "category_kept": cross["kept"]})):
        for k, v in rates.items():
            if not v:             # nothing judgeable (e.g. a coarse word on its threshold for every object)
                continue
            rate = proportion(v, "p")
            out[prefix + k], out[f"{prefix}{k}_se"] = rate["p"], rate["se"]
    for prefix, values, spreads, reads in (("", fidelity, spread, readings),
                                           ("cross_", cross["fidelity"], cross["spread"], cross["readings"])):
        if values:
            out[prefix + "silhouette_own_minus_other"] = float(np.mean(values))
            out[prefix + "silhouette_own_minus_other_se"] = float(np.std(values) / np.sqrt(len(values)))
            out[prefix + "diversity"] = float(np.mean(spreads))
            if not np.isnan(reads).any():
                out[prefix + "shape_spread"] = float(np.mean(reads))
    out["samples_per_cell"] = len(fidelity)
    return out


def table(rows: dict, key: str, factors) -> str:
    columns = (*factors, "silhouette_own_minus_other", "colour", "diversity", "shape_spread")
    if any("cross_diversity" in row for row in rows.values()):
        columns += ("category_kept", *(f"cross_{f}" for f in factors), "cross_silhouette_own_minus_other",
                    "cross_category_kept", "cross_diversity", "cross_shape_spread")
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
    p.add_argument("--backgrounds", default="", help=f"ToyWorld 2: train every weight on each background level "
                   f"({', '.join(BACKGROUND_ROOTS)}; comma-separated); default: the config's data.root")
    p.add_argument("--cross-category", action="store_true", help="ToyWorld 2: also 'a {B} in the shape of *s' "
                   "for every other category B")
    p.add_argument("--fit", action="store_true", help="score each run after HyperDreamBooth's regression phase "
                   "(tune.py --targets, then --fit: <run>_fit), the encoder's one pass that carries the shape")
    args = p.parse_args(argv)
    backgrounds = [b.strip() for b in args.backgrounds.split(",") if b.strip()] or [None]
    unknown = [b for b in backgrounds if b is not None and b not in BACKGROUND_ROOTS]
    if unknown:
        p.error(f"--backgrounds {unknown[0]}: not one of {', '.join(BACKGROUND_ROOTS)}")
    if backgrounds != [None] or args.cross_category:
        from guided_concepts.configs.schema import load_config
        if load_config(args.config).model.name != "toyworld2":
            p.error(f"--backgrounds / --cross-category: ToyWorld 2 only, and --config {args.config} is not on "
                    "model toyworld2 (pass --config configs/toyworld2.yaml)")
    extra = [x for item in args.set for x in ("--set", item)]
    weights = [float(w) for w in args.weights.split(",")]
    started = time.time()
    runs = {(b, w): train_run(args.out, w, args.steps, extra, args.config, b) for b in backgrounds for w in weights}
    if args.fit:
        runs = {key: fitted(run) for key, run in runs.items()}
    scorer = world = None
    rows, curve = {}, {}
    for (b, w), run in runs.items():
        system, cfg = generate.load_run(run)
        world = world or world_of(held_out_objects(cfg))
        scorer = scorer or world.load_scorer(resolve_model_path(cfg.model.name))
        name = f"{b}, mask weight {w:g}" if b else f"mask weight {w:g}"
        rows[name] = score(system, cfg, args.seeds, args.sample_steps, args.guidance_scale, scorer,
                           cross_category=args.cross_category)
        print(f"{name}: {rows[name]}", flush=True)
        if (b, w) == (backgrounds[0], weights[0]):
            for tau in (float(t) for t in args.taus.split(",")):
                curve[f"tau {tau:g}"] = score(system, cfg, args.seeds, args.sample_steps, args.guidance_scale, scorer,
                                              tau, cross_category=args.cross_category)
                print(f"tau {tau:g}: {curve[f'tau {tau:g}']}", flush=True)
    first = f"{backgrounds[0]}, mask weight {weights[0]:g}" if backgrounds[0] else f"mask weight {weights[0]:g}"
    result = {"steps": args.steps, "seeds": args.seeds, "mask_variant": "mse_maxnorm", "fit": args.fit, "weights": rows,
              "diversity_curve_on": first, "diversity_curve": curve, "seconds": round(time.time() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(rows, "run", world.binary_factors) + "\n" + table(curve, "diversity tau", world.binary_factors)
    (args.out / "table.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
