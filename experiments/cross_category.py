"""Cross-category swap matrix: does a shape word encoded from an object of category A shape an
object of category B?

For every ordered pair of held-out ToyWorld 2 objects (A = donor, B = recipient) the prompt is
"a {B} in the shape of *s ..." with `*s` from A and every other word (pose, appearance) from B.
Read back with the world's scorer and true renders:

    each shape parameter: follows A (read nearer A's value than B's), and its error against A's
    silhouette: IoU against the true render of B's category with A's shape (at the sample's
        camera) minus IoU against B itself; follows A when positive (ΔIoU: the mean difference)
    category: stays B ("kept"); follows A only where A's category differs (leakage)
    colour: follows A (leakage; B's appearance word should hold it)

The A = B block (same category) and the A ≠ B block are reported separately, each with the
reference rows of the same-category matrix: `*s` from A (the encoder's one pass), `*s` tuned on A
(E4T's stage 2), A's shape in words, no `*s`, and `*s` inverted on A (textual inversion). Two
amplifier candidates that need no training add rows: `*s` moved further from its initializer
(--shape-strength λ, generate.py --strength shape=λ), and `*s` written as a residual on B's
category word, in the noun's place ("a *s with pose *p", its embedding B's word plus what `*s`
learned: ShapeWords' design, applied at generation only).

    python -m experiments.cross_category --train --out runs/cross          # trains configs/toyworld2.yaml first
    python -m experiments.cross_category --run runs/tw2swap/run --out runs/cross --ti-steps 0

Writes results.json, table.md and figure.png (A ≠ B, first seed: one donor per category onto one
object of each other category; columns A, B, B with A's shape, then a sample of every row).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from guided_concepts.toyworld.probes import (DISTANCE, ELEVATION, ROW_MODES, add_matrix_args, camera_of, cell_text,
                                             encode_word, factors_of, inversion_words, pairs_of, sample_batch, score,
                                             swap_inputs, train_run, truth_of, tuned_words, world_of)
from guided_concepts import generate
from guided_concepts.argtypes import finite_float
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.tokens import TokenError
from guided_concepts import sampling

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toyworld2.yaml"
BLOCKS = ("A = B", "A ≠ B")


def blocks_of(world, truths: list) -> dict[str, list[tuple[int, int]]]:
    """Every ordered pair of distinct objects, split by whether donor and recipient share a category."""
    pairs = pairs_of(world, truths, same_category=False)
    same = [(a, b) for a, b in pairs if world.noun(truths[a]) == world.noun(truths[b])]
    return {"A = B": same, "A ≠ B": [p for p in pairs if p not in same]}


def markdown_table(world, rows: dict) -> str:
    factors = [f for f in factors_of(world) if f != "direction"]
    lines = ["| pairs | row | " + " | ".join(factors) + " |", "|---" * (len(factors) + 2) + "|"]
    for (block, label), cells in rows.items():
        text = [cell_text(cells[f], "**" if f in (*world.shape_factors, "silhouette") else "") if f in cells else "–"
                for f in factors]
        lines.append(f"| {block} | {label} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def on_white(world, scorer, images: torch.Tensor) -> dict:
    """The share of samples drawn on a white background, as every held-out object's views are
    (the prompts name no background): more than 90% of the pixels outside the scorer's mask are
    near white. Whether a word carries its views' background shows as a rise over the row without it."""
    outside = ~world.silhouette(scorer, images)                                         # [N, H, W]
    white = (images.amin(1) > 0.85)                                                      # [N, H, W]
    share = (white & outside).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp(min=1)
    flags = (share > 0.9).tolist()
    p = sum(flags) / len(flags)
    return {"white": p, "n": len(flags), "se": (p * (1 - p) / len(flags)) ** 0.5}


def holds_table(world, rows: dict, token: str) -> str:
    """What the shape word holds (the notes' doubt): across categories (A ≠ B), the share of samples
    in which each factor follows A, for every row that writes a `*s` of A (one pass, tuned,
    inverted), beside the same share without `*s` (what the prompt gives by chance). A factor
    `*s` holds rises above its no-word share: every shape parameter should; category, colour and
    camera (direction) should not."""
    cross = {label: cells for (block, label), cells in rows.items() if block == "A ≠ B"}
    none = cross.get(f"without {token}")
    words = {label: cells for label, cells in cross.items() if label.startswith(token)}
    if none is None or not words:
        return ""
    lines = [f"| factor | without {token} | " + " | ".join(words) + " |",
             "|---" * (len(words) + 2) + "|"]
    for factor in ("category", "colour", "direction", *world.shape_factors, "silhouette"):
        if "follows" not in none.get(factor, {}):
            continue
        n = none[factor]
        cells = []
        for cells_of in words.values():
            w = cells_of.get(factor, {})
            cells.append(f"{w['follows']:.2f} ({w['follows'] - n['follows']:+.2f} ± {(w['se'] ** 2 + n['se'] ** 2) ** 0.5:.2f})"
                         if "follows" in w else "–")
        lines.append(f"| {factor} | {n['follows']:.2f} (n={n['n']}) | " + " | ".join(cells) + " |")
    if "white" in none.get("background", {}):         # every view of A is on white: drawn on white
        n = none["background"]
        cells = [f"{c['background']['white']:.2f} ({c['background']['white'] - n['white']:+.2f} ± "
                 f"{(c['background']['se'] ** 2 + n['se'] ** 2) ** 0.5:.2f})" if "background" in c else "–"
                 for c in words.values()]
        lines.append(f"| background: on white, as A's views | {n['white']:.2f} (n={n['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(world, truths: list, pairs: list, images: dict, seeds: int, resolution: int, path: Path) -> None:
    """One row per example pair (one donor per category, every other category as recipient):
    A, B, the true render of B with A's shape, then a sample of each row (images: row -> samples)."""
    from guided_concepts.toyworld.world2_pretraining import labelled_grid

    def render(truth, direction):
        pixels = world.render(truth, camera_of(direction)["azimuth"], ELEVATION, DISTANCE, resolution)[0]
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255

    donors = {}
    for a, _ in pairs:
        donors.setdefault(world.noun(truths[a]), a)
    rows = []
    for a in donors.values():
        recipients = {}
        for pa, b in pairs:
            if pa == a:
                recipients.setdefault(world.noun(truths[b]), b)
        for b in recipients.values():
            index = pairs.index((a, b))
            direction = (a + 2 * b + 3) % 8                          # B's camera, as swap_condition draws it
            cells = [render(truths[a], direction), render(truths[b], direction),
                     render(world.with_shape_of(truths[b], truths[a]), direction)]
            cells += [samples[index * seeds] for samples in images.values()]
            rows.append((f"{world.noun(truths[a])} -> {world.noun(truths[b])}", torch.stack(cells)))
    names = {"word": "*s", "tuned": "*s tuned", "text": "words", "none": "no *s", "ti": "TI", "residual": "residual"}
    columns = ["A", "B", "B, A's shape", *[names.get(m, m.replace("strength ", "*s x")) for m in images]]
    labelled_grid(rows, path, columns, label_width=120)


def run_cross_category(run: Path, out: Path, seeds: int = 2, steps: int = 20, guidance: float = 4.0,
                       ti_steps: int = 300, modes=("word", "tuned", "text", "none", "ti", "residual"), tuned_steps: int = 15,
                       hue_jitter: float = 0.5, strengths: tuple[float, ...] = (), log=print) -> dict:
    """strengths: extra rows of the encoder's *s moved from its initializer by each factor
    (system.with_strength, generate.py --strength shape=λ)."""
    system, cfg = generate.load_run(run)
    if "shape" not in system.tokens:
        raise ValueError(f"{run}: no shape word (tokens: {', '.join(system.tokens)})")
    objects = held_out_objects(cfg, run)
    truths = [truth_of(f) for f in objects]
    world = world_of(objects)
    if "category" not in world.factors:
        raise ValueError(f"{run}: its objects come from a world with one category; cross-category shape needs "
                         f"ToyWorld 2 objects (--config {CONFIG.relative_to(CONFIG.parent.parent)})")
    blocks = blocks_of(world, truths)
    if not all(blocks.values()):
        raise ValueError(f"{run}: the held-out objects need two categories and two objects of one category "
                         "(raise data.holdout)")
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    active = [n for n in system.tokens if n in ("shape", "pose", "appearance")]
    started = time.time()
    words = {n: ({d: encode_word(system, cfg, n, camera_of(d)) for d in range(8)} if n == "pose" else
                 {i: encode_word(system, cfg, n, f) for i, f in enumerate(objects)}) for n in active}
    ti = tuned = None
    if "ti" in modes and ti_steps > 0:
        t0 = time.time()
        ti = inversion_words(run, objects, ["shape"], ti_steps, out)
        log(f"textual inversion: {time.time() - t0:.0f} s")
    if "tuned" in modes and tuned_steps > 0:
        t0 = time.time()
        tuned = tuned_words(run, objects, ["shape"], tuned_steps, out, hue_jitter)
        log(f"encoder + {tuned_steps} tuning steps: {time.time() - t0:.0f} s")
    token = system.heads["shape"].config.token
    conditions = [(mode, label.format(token=token, tuned=tuned_steps, which=token,
                                      jitter=f", hue jitter {hue_jitter:g}" if hue_jitter else ""), words)
                  for mode, label in ROW_MODES
                  if mode in modes and not (mode == "ti" and ti is None) and not (mode == "tuned" and tuned is None)]
    if "residual" in modes:
        conditions.append(("residual", f"{token} as a residual on B's category word (ShapeWords)", words))
    for strength in strengths:
        stacked = torch.stack([words["shape"][i] for i in range(len(objects))])             # [N, K, D]
        scaled = sampling.with_strength(system, {"shape": SimpleNamespace(embeds=stacked)}, {"shape": strength})
        conditions.append((f"strength {strength:g}", f"{token} from A, strength {strength:g}",
                           {**words, "shape": dict(enumerate(scaled["shape"].embeds))}))
    init = system.table.initializer_rows["shape"].reshape(1, -1)                          # [1, D]
    noun_rows = {}
    for noun in sorted({world.noun(t) for t in truths}):
        try:
            noun_rows[noun] = system.table.word_row(noun).reshape(1, -1)                 # [1, D]
        except TokenError as error:       # a noun of several tokens has no one row to add to
            if "residual" in modes:
                log(f"residual row: {error}; pairs onto a {noun} are left out of that row")
    rows, cross_images = {}, {}
    for block, pairs in blocks.items():
        for mode, label, given in conditions:
            t0 = time.time()
            kept = [p for p in pairs if world.noun(truths[p[1]]) in noun_rows] if mode == "residual" else pairs
            prompts, embeds, items = swap_inputs(system, cfg, world, kept, "shape",
                                                 "word" if mode.startswith("strength") else mode, truths, given,
                                                 {"ti": ti, "tuned": tuned}.get(mode), seeds)
            if mode == "residual":       # B's noun embedding plus what *s learned (its offset from its initializer)
                embeds["shape"] = [noun_rows[world.noun(item["sample_truth"])].to(e) + e - init.to(e)
                                   for e, item in zip(embeds["shape"], items)]
            images = sample_batch(system, prompts, {n: torch.stack(v) for n, v in embeds.items()}, seed=1000,
                                  steps=steps, guidance=guidance)
            cells = score(world, images, scorer, items)
            cells["background"] = on_white(world, scorer, images)
            rows[(block, label)] = cells
            log(f"{block} / {mode}: {len(prompts)} samples, {time.time() - t0:.0f} s; e.g. {prompts[-1]!r}")
            if block == "A ≠ B" and kept == pairs:                     # the figure indexes every pair
                cross_images[mode] = images
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run), "held_out_objects": [o.name for o in objects],
              "pairs": {block: len(pairs) for block, pairs in blocks.items()}, "seeds": seeds, "sample_steps": steps,
              "guidance_scale": guidance, "ti_steps": ti_steps if ti else 0, "tuned_steps": tuned_steps if tuned else 0,
              "hue_jitter": hue_jitter, "seconds": round(time.time() - started, 1),
              "rows": [{"pairs": block, "row": label, **cells} for (block, label), cells in rows.items()]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(world, rows)
    holds = holds_table(world, rows, token)
    (out / "table.md").write_text(table + (f"\nWhat {token} holds (A ≠ B): the share following A (its difference from "
                                           f"the row without {token} ± se)\n\n{holds}" if holds else ""))
    if cross_images:
        figure(world, truths, blocks["A ≠ B"], cross_images, seeds, cfg.data.resolution, out / "figure.png")
    log(table)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_args(p, "a trained ToyWorld 2 run with a shape word", Path("runs/cross_category"))
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--tuned-hue-jitter", type=float, default=0.5, help="tune.hue_jitter of the tuned row")
    p.add_argument("--rows", default="word,tuned,text,none,ti,residual", help="which rows to sample: word, tuned, "
                   "text, none, ti, residual (*s's offset added to B's category word in its place: ShapeWords)")
    p.add_argument("--shape-strength", default="", help="comma-separated: extra rows of *s amplified by each factor "
                   "(generate.py --strength shape=λ), e.g. 1.5,2")
    args = p.parse_args(argv)
    try:
        strengths = tuple(finite_float(v) for v in args.shape_strength.split(",") if v.strip())
    except argparse.ArgumentTypeError as error:
        p.error(f"--shape-strength: {error}")
    known = [m for m, _ in ROW_MODES] + ["residual"]
    unknown = [m for m in args.rows.split(",") if m not in known]
    if unknown:
        p.error(f"--rows {unknown[0]}: not one of {', '.join(known)}")
    run = train_run(args.out, args.config, args.tokens, args.steps, args.set) if args.train else args.run
    if run is None:
        p.error("give --run or --train")
    try:
        return run_cross_category(run, args.out, args.seeds, args.sample_steps, args.guidance_scale, args.ti_steps,
                                  modes=tuple(args.rows.split(",")), tuned_steps=args.tuned_steps,
                                  hue_jitter=args.tuned_hue_jitter, strengths=strengths)
    except ValueError as error:           # a run of the wrong world, too few held-out objects: one line
        p.error(str(error))


if __name__ == "__main__":
    main()
