"""Probes that read a trained run's words back on ToyWorld: encode a word from an object, sample
prompts with given word embeddings, score the samples against the world's truth (follows donor A
or recipient B, errors, IoU differences), and the per-object references (textual inversion, E4T's
tuning). The swap matrix, the cross-category matrix and the other experiments are built on these.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from guided_concepts import generate
from guided_concepts.argtypes import positive_int
from guided_concepts.concepts import CONCEPTS
from guided_concepts.concepts.pose import camera_batch
from guided_concepts.prompts import render_prompt
from guided_concepts.system import to_device
from guided_concepts.toyworld.scorer import mask_iou
from guided_concepts.toyworld.truth import WorldTruth, truth_of_folder
from guided_concepts.toyworld.world import DIRECTIONS, direction_azimuth
from guided_concepts import sampling


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
    concept = system.heads[name]
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
            clauses[name] = system.clauses[name]
        elif mode[name] == "residual":
            noun = system.heads[name].config.token
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
        encoded = {n: SimpleNamespace(embeds=e[start:start + chunk]) for n, e in embeds.items()}
        image, _ = sampling.sample(system, prompts[start:start + chunk], steps=steps, guidance_scale=guidance,
                                 seed=seed + start, encoded=encoded)
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
                                         {"shape": system.clauses["shape"]}))
            embeds.append(word_of(i))
            items.append(truths[i])
    images = sample_batch(system, prompts, {"shape": torch.stack(embeds)}, seed=2000, steps=steps, guidance=guidance)
    return attribute_accuracy(world, images, scorer, items)



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
