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
import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from guided_concepts import generate
from guided_concepts.argtypes import positive_int
from guided_concepts.concepts.pose import camera_batch
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.concepts import CONCEPTS
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.system import render_prompt, to_device
from guided_concepts.toyworld.scorer import mask_iou
from guided_concepts.toyworld.truth import WorldTruth, truth_of_folder
from guided_concepts.toyworld.world import DIRECTIONS, direction_azimuth

ELEVATION, DISTANCE = 20.0, 2.5


def factors_of(world: WorldTruth) -> tuple[str, ...]:
    """The matrix's columns: the world's shape factors, silhouette, direction, then the rest the
    scorer reads (colour; ToyWorld 2: category)."""
    return (*world.shape_factors, "silhouette", "direction", *(f for f in world.factors if f not in world.shape_factors))


def owns_of(world: WorldTruth) -> dict:
    """What each word is meant to carry; everything else it changes is leakage."""
    return {"shape": (*world.shape_factors, "silhouette"), "pose": ("direction", "silhouette"), "appearance": ("colour",)}


# ----------------------------------------------------------------------------------------------
# Words from objects
# ----------------------------------------------------------------------------------------------
def truth_of(folder: Path):
    return truth_of_folder(folder)[1]


def world_of(objects: list[Path]) -> WorldTruth:
    return truth_of_folder(objects[0])[0]


@functools.lru_cache(maxsize=None)
def true_mask(world: WorldTruth, truth, azimuth: float, resolution: int) -> torch.Tensor:
    """The object's true silhouette at a sample camera (bool [H, W]); renders are cached."""
    return torch.from_numpy(world.render(truth, azimuth, ELEVATION, DISTANCE, resolution)[1])


def pairs_of(world: WorldTruth, truths: list, same_category: bool) -> list[tuple[int, int]]:
    """Ordered (donor, recipient) pairs of distinct objects; of one category with same_category."""
    return [(a, b) for a in range(len(truths)) for b in range(len(truths))
            if a != b and (not same_category or world.noun(truths[a]) == world.noun(truths[b]))]


def camera_of(direction: int) -> dict:
    return {"azimuth": direction_azimuth(direction), "elevation": ELEVATION, "distance": DISTANCE}


@torch.no_grad()
def encode_word(system, cfg, name: str, source) -> torch.Tensor:
    """The word's embedding [K, D]: from an object folder, or (pose) a camera dict."""
    concept = system.concepts[name]
    concept.diversity = 0.0
    if isinstance(source, dict):
        batch = camera_batch(source, getattr(cfg.concepts[name], "distance_range", None))
    else:
        batch = generate.concept_reference_batch(source, 0, cfg, name)
    device = next(system.backbone.unet.parameters()).device
    return concept.encode(to_device(batch, device)).embeds[0].detach()


def words_clause(world: WorldTruth, name: str, truth, direction: int) -> str:
    """The factor a word owns, written in the world's caption words."""
    if name == "shape":
        return world.shape_words(truth)
    if name == "pose":
        return f"seen from the {DIRECTIONS[direction]}"
    if name == "appearance":
        return world.colour_word(truth)
    raise ValueError(f"no words for {name}")


def build_prompt(system, world: WorldTruth, words: list[str], mode: dict[str, str], donor, direction: int,
                 noun: str) -> str:
    """mode: word -> "word" (the learned word), "ti" (an inverted word in its place), "text" (the
    donor's factor in words), "none", or "residual" (the word in the noun's place, its embedding
    the noun's plus what it learned: ShapeWords). noun: the recipient's category."""
    clauses, colour = {}, ""
    for name in words:
        if mode[name] in ("word", "ti", "tuned"):  # the learned, inverted or tuned word: same clause
            clauses[name] = system.clause(name)
        elif mode[name] == "residual":
            noun = system.concepts[name].config.token
        elif mode[name] == "text":
            if name == "appearance":
                colour = words_clause(world, name, donor, direction) + " "
            else:
                clauses[name] = words_clause(world, name, donor, direction)
    return render_prompt("a {category} {phrases}", colour + noun, clauses)


# ----------------------------------------------------------------------------------------------
# One condition: sample every (pair, seed), score it
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_batch(system, prompts: list[str], embeds: dict[str, torch.Tensor], seed: int, steps: int,
                 guidance: float, chunk: int = 32) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), chunk):
        outs = {n: SimpleNamespace(embeds=e[start:start + chunk]) for n, e in embeds.items()}
        image, _ = system.sample(prompts[start:start + chunk], steps=steps, guidance_scale=guidance,
                                 seed=seed + start, outs=outs)
        images.append(image)
    return torch.cat(images)


def proportion(flags: list, key: str = "follows") -> dict:
    """{key: the share of True, n, se (binomial standard error)}."""
    p = float(np.mean(flags))
    return {key: p, "n": len(flags), "se": float(np.sqrt(p * (1 - p) / len(flags)))}


def attribute_accuracy(world: WorldTruth, images, scorer, truths: list) -> dict:
    """The shape factors read back from each image against its object's truth."""
    read = world.read(scorer, images)
    flags = {f: [flag for k, t in enumerate(truths) for flag in world.flags(f, [read[f][k]], t)]
             for f in world.shape_factors}
    return {f: proportion(v, "accuracy") for f, v in flags.items() if v}


def score(world: WorldTruth, images, scorer, items: list[dict]) -> dict:
    """Per factor: follows-donor flags where donor and recipient differ, and IoU differences;
    for a continuous factor also its mean error against the donor's value ("error", every
    sample), and for the category the share that stays the recipient's ("kept")."""
    read = world.read(scorer, images)
    shapes = world.silhouette(scorer, images)
    follows = {f: [] for f in factors_of(world)}
    errors, kept = {}, []
    iou_diff = []
    for i, item in enumerate(items):
        a, b = item["donor_truth"], item["sample_truth"]           # the factors the sample could follow
        for factor in world.factors:
            flag = world.follows(factor, read[factor][i], a, b)
            if flag is not None:
                follows[factor].append(bool(flag))
            if isinstance(world.value(a, factor), float):
                errors.setdefault(factor, []).append(abs(read[factor][i] - world.value(a, factor)))
        if "category" in world.factors:
            kept.append(read["category"][i] == world.value(b, "category"))
        if item["donor_direction"] != item["sample_direction"]:
            follows["direction"].append(read["direction"][i] == item["donor_direction"])
        iou_a = float(mask_iou(shapes[i:i + 1], item["donor_mask"][None]))
        iou_b = float(mask_iou(shapes[i:i + 1], item["sample_mask"][None]))
        if not torch.equal(item["donor_mask"], item["sample_mask"]):
            follows["silhouette"].append(iou_a > iou_b)
            iou_diff.append(iou_a - iou_b)
    out = {factor: proportion(values) for factor, values in follows.items() if values}
    for factor, values in errors.items():
        out.setdefault(factor, {})["error"] = float(np.mean(values))
    if kept:
        out.setdefault("category", {})["kept"] = float(np.mean(kept))
    if iou_diff:
        out["silhouette"]["iou_difference"] = float(np.mean(iou_diff))
        out["silhouette"]["iou_difference_se"] = float(np.std(iou_diff) / np.sqrt(len(iou_diff)))
    return out


def swap_condition(system, cfg, world: WorldTruth, pairs, swapped: str, mode: str, objects, truths, words: dict,
                   ti: dict | None, seeds: int, steps: int, guidance: float, scorer) -> tuple[dict, torch.Tensor, list]:
    """Sample and score one row: -> (cells, images [N,3,H,W], prompts). See swap_inputs."""
    prompts, embeds, items = swap_inputs(system, cfg, world, pairs, swapped, mode, truths, words, ti, seeds)
    stacked = {n: torch.stack(v) for n, v in embeds.items()}
    images = sample_batch(system, prompts, stacked, seed=1000, steps=steps, guidance=guidance)
    return score(world, images, scorer, items), images, prompts


def swap_inputs(system, cfg, world: WorldTruth, pairs, swapped: str, mode: str, truths, words: dict,
                ti: dict | None, seeds: int) -> tuple[list, dict, list]:
    """One row's prompts, word embeddings (name -> [K, D] per sample) and scoring items.
    mode: "word" (A's word), "text" (A's factor in words), "none" (no word), "ti" (A's inverted
    word), "tuned" (E4T's stage 2: every chair's object-level words tuned on that chair with
    tune.py's few steps from the encoder, given in `ti`; A's for the swapped word, B's for the rest;
    the pose word stays the encoder's), "residual" (A's word in the noun's place; the caller adds
    the noun's embedding)."""
    active = [n for n in system.tokens if n in owns_of(world)]
    prompts, embeds, items = [], {n: [] for n in active}, []
    res = cfg.data.resolution
    for a, b in pairs:
        dir_a, dir_b = (a + 2 * b) % 8, (a + 2 * b + 3) % 8        # two cameras 135 degrees apart
        cam_a, cam_b = camera_of(dir_a)["azimuth"], camera_of(dir_b)["azimuth"]
        if swapped == "pose":     # B's chair, seen from A's camera instead of B's
            donor_truth, donor_dir, donor_mask = truths[b], dir_a, true_mask(world, truths[b], cam_a, res)
        else:                     # A's shape (and appearance) at B's camera, in B's category
            donor_truth, donor_dir = truths[a], dir_b
            donor_mask = true_mask(world, world.with_shape_of(truths[b], truths[a]), cam_b, res)
        sample_mask = true_mask(world, truths[b], cam_b, res)
        mode_of = {n: ("word" if n != swapped else mode) for n in active}
        for s in range(seeds):
            prompts.append(build_prompt(system, world, active, mode_of, truths[a], dir_a, world.noun(truths[b])))
            for n in active:
                index = (dir_a if n == "pose" else a) if n == swapped else (dir_b if n == "pose" else b)
                if mode == "tuned" and n in ti:         # E4T: every object's words tuned on it
                    source = ti
                else:
                    source = ti if (n == swapped and mode == "ti") else words
                embeds[n].append(source[n][index])
            items.append({"donor_truth": donor_truth, "sample_truth": truths[b], "donor_direction": donor_dir,
                          "sample_direction": dir_b, "donor_mask": donor_mask, "sample_mask": sample_mask})
    return prompts, embeds, items


# ----------------------------------------------------------------------------------------------
# Per-object textual inversion (the ceiling)
# ----------------------------------------------------------------------------------------------
def inversion_words(run: Path, objects: list[Path], names: list[str], steps: int, out: Path) -> dict:
    """Per-object textual inversion with the run's own tuning code (tune.py --mode
    textual_inversion): every word a free vector from its initializer, denoising loss only.
    Shape and appearance: one inversion per chair (its 8 views). Pose: one per direction, on
    ToyWorld renders of the held-out chairs at that camera (the pose is what they share)."""
    result = {n: {} for n in names}
    per_chair = [n for n in names if n != "pose"]
    for i, folder in enumerate(objects if per_chair else []):
        info = tuned(run, folder, steps, out / "ti" / folder.name, "textual_inversion")
        for n in per_chair:
            result[n][i] = load_token(Path(info["path"]) / "tokens" / f"{n}.safetensors")
    if "pose" in names:
        for direction in range(8):
            folder = out / "ti_pose_data" / f"direction_{direction}"
            if not folder.exists():
                write_camera_object(folder, objects, direction)
            info = tuned(run, folder, steps, out / "ti" / folder.name, "textual_inversion")
            result["pose"][direction] = load_token(Path(info["path"]) / "tokens" / "pose.safetensors")
    return result


def tuned_words(run: Path, objects: list[Path], names: list[str], steps: int, out: Path, hue_jitter: float = 0.0) -> dict:
    """E4T's stage 2 (tune.py, mode encoder): each chair's words after `steps` tuning steps from the
    run's heads on its 8 views. Object-level words among `names` only (a pose word belongs to a
    camera); the words left out stay the encoder's."""
    result = {n: {} for n in names if CONCEPTS[n].concept.object_level}
    for i, folder in enumerate(objects if result else []):
        label = f"{steps}_steps" + (f"_hue_jitter_{hue_jitter:g}" if hue_jitter else "")
        info = tuned(run, folder, steps, out / "tuned" / label / folder.name, "encoder", {"hue_jitter": hue_jitter})
        for n in result:
            result[n][i] = load_token(Path(info["path"]) / "tokens" / f"{n}.safetensors")
    return result


def tuned(run: Path, folder: Path, steps: int, path: Path, mode: str, overrides: dict | None = None) -> dict:
    """tune.py's artefact for one object, reused when an earlier run of the experiment left it.
    Textual inversion as a new user runs it: lr 5e-3, batch 8, denoising loss only."""
    from guided_concepts import tune
    if (path / "artefact.json").exists():
        return {**json.loads((path / "artefact.json").read_text()), "path": str(path)}
    if mode == "textual_inversion":
        overrides = {"steps": steps, "batch_size": 8, "lr": 5e-3, "losses": {}}
    return tune.tune_object(run, folder, steps, path, mode=mode, overrides=overrides)


def load_token(path: Path) -> torch.Tensor:
    """A token file's vectors [K, D] (SDXL files: both encoders' parts)."""
    from guided_concepts.tokens.export import load_token as read
    vectors = read(path)[1]
    return vectors.reshape(-1, vectors.shape[-1]).float()


def write_camera_object(folder: Path, objects: list[Path], direction: int) -> None:
    """One 'object' whose views are different objects seen from one camera (for a pose inversion)."""
    from PIL import Image
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    views = {}
    for i, source in enumerate(objects):
        world, truth = truth_of_folder(source)
        elevation = 10.0 + 5 * (i % 4)
        image, mask = world.render(truth, direction_azimuth(direction), elevation, DISTANCE, world.resolution)
        Image.fromarray(image).save(folder / "views" / f"{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{i:03d}.png")
        views[f"{i:03d}"] = {"azimuth": direction_azimuth(direction), "elevation": elevation, "distance": DISTANCE}
    (folder / "meta.json").write_text(json.dumps({"category": world.noun(truth), "views": views}))


# ----------------------------------------------------------------------------------------------
# The ladder: how much of the inversion ceiling the encoder reaches, at what cost
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def own_word_accuracy(system, cfg, world, objects, truths, word_of, seeds: int, steps: int, guidance: float,
                      scorer) -> dict:
    """"a chair in the shape of *s" with each object's own word: the shape factors read back = the object's."""
    prompts, embeds, items = [], [], []
    for i in range(len(objects)):
        for _ in range(seeds):
            prompts.append(render_prompt("a {category} {phrases}", world.noun(truths[i]),
                                         {"shape": system.clause("shape")}))
            embeds.append(word_of(i))
            items.append(truths[i])
    images = sample_batch(system, prompts, {"shape": torch.stack(embeds)}, seed=2000, steps=steps, guidance=guidance)
    return attribute_accuracy(world, images, scorer, items)


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


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
ROW_MODES = (("word", "{token} from A"), ("tuned", "{token} from A, {which} tuned {tuned} steps per chair (E4T{jitter})"),
             ("text", "A's factor in words"), ("none", "without {token}"),
             ("ti", "{token} inverted on A (textual inversion)"))


def cell_text(cell: dict, mark: str = "") -> str:
    """'0.75 ± 0.04 (n=96, ΔIoU +0.031, error 0.12, kept 0.95)', the parts the cell has."""
    extra = [f"ΔIoU {cell['iou_difference']:+.3f}"] if "iou_difference" in cell else []
    extra += [f"error {cell['error']:.3f}"] if "error" in cell else []
    extra += [f"kept {cell['kept']:.2f}"] if "kept" in cell else []
    if "follows" not in cell:
        return ", ".join(extra) or "–"
    return f"{mark}{cell['follows']:.2f}{mark} ± {cell['se']:.2f} (n={', '.join([str(cell['n']), *extra])})"


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
        " and ".join(system.concepts[n].config.token for n in tuned_by) + " (others the encoder's)"
    rows, grids = {}, []
    for swapped in active:
        token = system.concepts[swapped].config.token
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


def train_run(out: Path, config: Path, tokens: str, steps: int, sets: list[str]) -> Path:
    """out/run trained with train.py (kept when it already has checkpoints)."""
    from guided_concepts import train
    run = out / "run"
    if not (run / "checkpoints").exists():
        train.main(["--config", str(config), "--tokens", tokens, "--name", "run", "--set", f"run.output_dir={out}",
                    "--set", f"train.steps={steps}", "--set", "train.sample_every=0",
                    *[x for item in sets for x in ("--set", item)]])
    return run


def add_matrix_args(p, run_help: str, out: Path) -> None:
    """The flags every swap-matrix experiment shares: which run (or train one), where to write,
    how many samples, textual inversion and tuning steps."""
    p.add_argument("--run", type=Path, help=run_help)
    p.add_argument("--train", action="store_true", help="train the run first (--config, --tokens, --steps)")
    p.add_argument("--tokens", default="shape,pose,appearance")
    p.add_argument("--steps", type=int, default=600, help="training steps with --train")
    p.add_argument("--set", action="append", default=[], help="extra train.py --set with --train")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--seeds", type=positive_int, default=2, help="samples per ordered pair of objects")
    p.add_argument("--sample-steps", type=positive_int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--ti-steps", type=int, default=300, help="per-object textual inversion steps (0: skip that row)")
    p.add_argument("--tuned-steps", type=int, default=15, help="the row of words tuned from the encoder on A "
                   "(tune.py, E4T's stage 2) for this many steps (0: skip that row)")


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
