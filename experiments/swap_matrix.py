"""Swap matrix: does each word control its own factor in what is generated?

For ordered pairs of held-out ToyWorld objects (A = donor, B = recipient; on ToyWorld 2 pairs of one
category unless --all-pairs), one word comes from A and every other word from B (pose: A's camera
instead of B's), and the sample is read back with the world's scorer and the true renders. For
every swapped word and every factor the matrix says how often the factor follows A, over the
samples where A and B differ in it:

    rows: words; columns: the world's shape factors (ToyWorld: arms, back; ToyWorld 2: legs,
    back, arms and the six shape parameters), silhouette, direction, colour (ToyWorld 2: category,
    counted only for pairs of two categories, with the share that stays B's)
    diagonal (a factor the word owns): control;  off-diagonal: leakage

A continuous parameter follows A when the scorer reads it nearer A's value than B's (pairs less
than 0.2 apart are not counted). Reference rows, scored the same way: the donor's factor written
in words instead of the word, the prompt without the word (what the other words and the class
word give), and per-object textual inversion of the word (the ceiling an encoder is judged
against; --ti-steps 0 skips it).

    python -m experiments.swap_matrix --run runs/words --out runs/words/swap     # ~5 min on 2 cores
    python -m experiments.swap_matrix --train --out runs/swap                     # trains the run first
    python -m experiments.swap_matrix --train --config configs/toyworld2.yaml --out runs/swap2

Silhouette: the sample's silhouette IoU against the donor-side truth (shape/appearance: B's object
with A's shape at the sample's camera, which is A's object when both share a category; pose: B's
object at A's camera) minus against the recipient-side truth;
"follows A" when that difference is positive, and the mean difference is reported too. Writes
results.json, table.md and samples.png (rows: words; columns: donor, recipient, samples).
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
from guided_concepts.concepts import CONCEPTS
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.prompts import render_prompt
from guided_concepts.toyworld.probes import (ROW_MODES, add_matrix_args, attribute_accuracy, camera_of, cell_text,
                                             encode_word, factors_of, inversion_words, load_token, own_word_accuracy,
                                             owns_of, pairs_of, sample_batch, swap_condition, train_run, truth_of,
                                             tuned, tuned_words, words_clause, world_of)
from guided_concepts.toyworld.truth import WorldTruth


def run_ladder(run: Path, out: Path, few_steps: int = 15, ti_steps: int = 300, seeds: int = 8, steps: int = 20,
               guidance: float = 4.0, log=print) -> dict:
    """Rows: the prompt without *s, the encoder alone (one forward pass), the encoder + tune.py's few
    steps (E4T stage 2), textual inversion with the same few steps, textual inversion with
    ti_steps (the ceiling), the attributes in words."""
    system, cfg = generate.load_run(run)
    objects = held_out_objects(cfg, run)
    truths = [truth_of(f) for f in objects]
    world = world_of(objects)
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    rows = {}
    t0 = time.time()
    encoded = [encode_word(system, cfg, "shape", f) for f in objects]
    rows["encoder alone"] = {**own_word_accuracy(system, cfg, world, objects, truths, lambda i: encoded[i], seeds,
                                                 steps, guidance, scorer), "steps": 0,
                             "seconds_per_object": (time.time() - t0) / len(objects)}
    for label, mode, count in ((f"encoder + {few_steps} tuning steps", "encoder", few_steps),
                               (f"textual inversion, {few_steps} steps", "textual_inversion", few_steps),
                               (f"textual inversion, {ti_steps} steps", "textual_inversion", ti_steps)):
        if count <= 0:
            continue
        words, seconds = [], []
        for folder in objects:
            same_as_matrix = mode == "textual_inversion" and count == ti_steps
            path = out / "ti" / folder.name if same_as_matrix else out / "ladder" / f"{mode}_{count}" / folder.name
            info = tuned(run, folder, count, path, mode)
            seconds.append(info["seconds"])
            words.append(load_token(Path(info["path"]) / "tokens" / "shape.safetensors"))
        rows[label] = {**own_word_accuracy(system, cfg, world, objects, truths, lambda i: words[i], seeds, steps,
                                           guidance, scorer), "steps": count, "seconds_per_object": float(np.mean(seconds))}
        log(f"ladder: {label}: {rows[label]}")
    # The references: no word, and the attributes written in words.
    for label, clause in (("without *s", None), ("the shape in words", "text")):
        prompts, items = [], []
        for i, t in enumerate(truths):
            for _ in range(seeds):
                clauses = {"shape": words_clause(world, "shape", t, 0)} if clause else {}
                prompts.append(render_prompt("a {category} {phrases}", world.noun(t), clauses))
                items.append(t)
        images = sample_batch(system, prompts, {}, seed=2000, steps=steps, guidance=guidance)
        rows[label] = attribute_accuracy(world, images, scorer, items)
    factors = world.shape_factors
    lines = ["| row | " + " | ".join(factors) + " | steps | s / object |", "|---" * (len(factors) + 3) + "|"]
    for label, row in rows.items():
        cells = [f"{row[f]['accuracy']:.2f} ± {row[f]['se']:.2f}" for f in factors]
        cost = [str(row.get("steps", "–")), f"{row['seconds_per_object']:.1f}" if "seconds_per_object" in row else "–"]
        lines.append(f"| {label} | " + " | ".join(cells + cost) + " |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1))
    (out / "ladder.md").write_text(table)
    log(table)
    return rows


def markdown_table(world: WorldTruth, rows: dict) -> str:
    factors, owns = factors_of(world), owns_of(world)
    lines = ["| swapped | row | " + " | ".join(factors) + " |", "|---" * (len(factors) + 2) + "|"]
    for (word, label), cells in rows.items():
        text = []
        for factor in factors:
            cell = cells.get(factor)
            if cell is None:
                text.append("–")
                continue
            text.append(cell_text(cell, "**" if factor in owns[word] else ""))
        lines.append(f"| {word} | {label} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def run_matrix(run: Path, out: Path, seeds: int = 2, steps: int = 20, guidance: float = 4.0, ti_steps: int = 300,
               modes=("word", "tuned", "text", "none", "ti"), tuned_steps: int = 15, tuned_names=None,
               hue_jitter: float = 0.0, same_category: bool = True, log=print) -> dict:
    """tuned_names: the words the "tuned" row takes from tune.py (default: every object-level word);
    the others stay the encoder's. same_category: pairs of one category only (ToyWorld 1 has one)."""
    system, cfg = generate.load_run(run)
    objects = held_out_objects(cfg, run)
    truths = [truth_of(f) for f in objects]
    world = world_of(objects)
    pairs = pairs_of(world, truths, same_category)
    if not pairs:
        raise ValueError(f"{run}: no two held-out objects share a category; hold out more (data.holdout) "
                         "or pass --all-pairs")
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    active = [n for n in system.tokens if n in owns_of(world)]
    started = time.time()     # tune.py loads its own copy of the run, so `system` stays as loaded here
    words = {n: ({d: encode_word(system, cfg, n, camera_of(d)) for d in range(8)} if n == "pose" else
                 {i: encode_word(system, cfg, n, f) for i, f in enumerate(objects)}) for n in active}
    ti = None
    if "ti" in modes and ti_steps > 0:
        t0 = time.time()
        ti = inversion_words(run, objects, active, ti_steps, out)
        log(f"textual inversion: {time.time() - t0:.0f} s")
    tuned_by = {}
    if "tuned" in modes and tuned_steps > 0:
        t0 = time.time()
        unknown = sorted(set(tuned_names or ()) - set(active))
        if unknown:
            raise ValueError(f"--tuned-words {','.join(unknown)}: not a word of this run ({', '.join(active)})")
        tuned_by = tuned_words(run, objects, list(tuned_names or active), tuned_steps, out, hue_jitter)
        log(f"encoder + {tuned_steps} tuning steps: {time.time() - t0:.0f} s")
    every_object_word = [n for n in active if CONCEPTS[n].concept.object_level]
    which = "words" if sorted(tuned_by) == sorted(every_object_word) else \
        " and ".join(system.heads[n].config.token for n in tuned_by) + " (others the encoder's)"
    rows, grids = {}, []
    for swapped in active:
        token = system.heads[swapped].config.token
        for mode, label in ROW_MODES:
            if mode not in modes or (mode == "ti" and ti is None) or (mode == "tuned" and not tuned_by):
                continue
            t0 = time.time()
            cells, images, prompts = swap_condition(system, cfg, world, pairs, swapped, mode, objects, truths, words,
                                                    tuned_by if mode == "tuned" else ti, seeds, steps, guidance, scorer)
            rows[(swapped, label.format(token=token, tuned=tuned_steps, which=which,
                                                   jitter=f", hue jitter {hue_jitter:g}" if hue_jitter else ""))] = cells
            log(f"{swapped} / {mode}: {len(prompts)} samples, {time.time() - t0:.0f} s; e.g. {prompts[0]!r}")
            if mode == "word":
                grids.append(images[: 2 * seeds * 7: seeds][:8])
    stds = {n: float(torch.stack(list(words[n].values())).std(0).norm()) for n in active}
    norms = {n: float(torch.stack(list(words[n].values())).norm(dim=-1).mean()) for n in active}
    result = {"run": str(run), "held_out_objects": [o.name for o in objects], "pairs": len(pairs), "seeds": seeds,
              "sample_steps": steps, "guidance_scale": guidance, "ti_steps": ti_steps if ti else 0,
              "tuned_steps": tuned_steps if tuned_by else 0, "tuned_words": sorted(tuned_by), "hue_jitter": hue_jitter,
              "word_std_across_sources": stds, "word_norm": norms, "seconds": round(time.time() - started, 1),
              "rows": [{"swapped": w, "row": label, **{f: cells.get(f) for f in factors_of(world)}} for (w, label), cells in rows.items()]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(world, rows)
    (out / "table.md").write_text(table)
    if grids:
        from guided_concepts.toyworld.evaluate import save_grid
        save_grid(torch.cat(grids), 8, out / "samples.png", scale=3)
    log(table)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_args(p, "a trained run with shape, pose and/or appearance (ToyWorld)", Path("runs/swap_matrix"))
    p.add_argument("--tuned-words", help="comma-separated: the words the tuned row tunes (default: every "
                   "object-level word); the others stay the encoder's")
    p.add_argument("--tuned-hue-jitter", type=float, default=0.0, help="tune.hue_jitter for the tuned row: "
                   "each tuning view's hue turned at random, so the tuned words do not take up the chair's colour")
    p.add_argument("--rows", default="word,tuned,text,none,ti", help="which rows (modes) to sample: word, tuned, "
                   "text, none, ti")
    p.add_argument("--ladder", action="store_true", help="also the ladder: encoder, encoder + few tuning steps, "
                   "textual inversion with as few and with --ti-steps steps (shape)")
    p.add_argument("--few-steps", type=int, default=15, help="the ladder's few tuning steps (tune.py's default)")
    p.add_argument("--all-pairs", action="store_true", help="every ordered pair of held-out objects, not only "
                   "pairs of one category (ToyWorld 2)")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "base.yaml",
                   help="the config --train trains with (configs/toyworld2.yaml: ToyWorld 2)")
    args = p.parse_args(argv)
    run = train_run(args.out, args.config, args.tokens, args.steps, args.set) if args.train else args.run
    if run is None:
        p.error("give --run or --train")
    try:
        result = run_matrix(run, args.out, args.seeds, args.sample_steps, args.guidance_scale, args.ti_steps,
                            modes=tuple(args.rows.split(",")), tuned_steps=args.tuned_steps,
                            tuned_names=args.tuned_words.split(",") if args.tuned_words else None,
                            hue_jitter=args.tuned_hue_jitter, same_category=not args.all_pairs)
    except ValueError as error:       # no pairs, an unknown --tuned-words: one line, no traceback
        p.error(str(error))
    if args.ladder:
        result["ladder"] = run_ladder(run, args.out, args.few_steps, args.ti_steps, steps=args.sample_steps,
                                      guidance=args.guidance_scale)
    return result


if __name__ == "__main__":
    main()
