"""ToyWorld 2's pretraining data: which objects are drawn, how they are captioned, what is held out,
and how the base model is scored (`python -m toyworld pretrain --world toyworld2`).

Captions name the category, colour, direction, background and three coarse shape words, each read
from the continuous shape (COARSE_WORDS): legs short or long, back low or tall, arms or none. A
word is only written when its value is clearly on one side (outside COARSE_MARGIN), so a caption
never says "long legs" of a middling leg. HELD_OUT_COMBOS: one (category, legs, back, arms)
combination per category never appears in pretraining; every single value still appears with
every category, so prompts that name a held-out combination test composition.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES, DECOYS, DIRECTIONS, PREFIXES, direction_bin
from guided_concepts.toyworld.world2 import BACKGROUNDS, CATEGORIES, SHAPE_PARAMS, Shape, WorldObject, render, sample_camera

# parameter -> (bit threshold, words for bit 0 and bit 1). Arms: the part is built above 0.125.
COARSE_WORDS = {"leg_length": (0.5, ("short legs", "long legs")),
                "back_height": (0.5, ("a low back", "a tall back")),
                "arm_height": (0.3, ("no arms", "arms"))}
COARSE_NAMES = ("legs", "back", "arms")      # how metrics name the three words
COARSE_MARGIN = 0.15          # a word is captioned only this far from its threshold
BACKGROUND_WORDS = ("on white", "on a floor", "among blocks")
# (category, legs, back, arms) never drawn for pretraining.
HELD_OUT_COMBOS = (("chair", 0, 1, 1), ("table", 1, 1, 0), ("sofa", 1, 0, 1), ("stool", 0, 0, 0))
SEEN_COMBOS = (("chair", 1, 0, 0), ("table", 0, 0, 1), ("sofa", 0, 1, 0), ("stool", 1, 1, 1))   # for comparison
NO_ARMS_SHARE = 0.4           # arms are absent this often (uniform values would give arms 87% of the time)


def coarse_bits(shape: np.ndarray) -> np.ndarray:
    """shape [..., 6] in SHAPE_PARAMS order -> bits [..., 3] (legs long, back tall, arms) by threshold."""
    columns = [SHAPE_PARAMS.index(n) for n in COARSE_WORDS]
    thresholds = np.array([t for t, _ in COARSE_WORDS.values()])
    return (np.asarray(shape)[..., columns] > thresholds).astype(np.int64)


def coarse_clear(shape: np.ndarray) -> np.ndarray:
    """shape [..., 6] -> bool [..., 3]: each coarse value far enough from its threshold to be named."""
    columns = [SHAPE_PARAMS.index(n) for n in COARSE_WORDS]
    thresholds = np.array([t for t, _ in COARSE_WORDS.values()])
    return np.abs(np.asarray(shape)[..., columns] - thresholds) > COARSE_MARGIN


def is_held_out(category: int, shape: np.ndarray) -> bool:
    bits = tuple(int(b) for b in coarse_bits(shape))
    return (CATEGORIES[category], *bits) in HELD_OUT_COMBOS


def sample_shape(rng: np.random.Generator) -> Shape:
    values = rng.random(len(SHAPE_PARAMS))
    if rng.random() < NO_ARMS_SHARE:
        values[SHAPE_PARAMS.index("arm_height")] = 0.0
    return Shape(*(float(v) for v in values))


def shape_with_bits(rng: np.random.Generator, bits) -> Shape:
    """A random shape whose coarse words are `bits` (legs, back, arms), each clearly on its side."""
    values = rng.random(len(SHAPE_PARAMS))
    for (name, (threshold, _)), bit in zip(COARSE_WORDS.items(), bits):
        low, high = (threshold + COARSE_MARGIN + 0.05, 1.0) if bit else (0.0, threshold - COARSE_MARGIN - 0.05)
        values[SHAPE_PARAMS.index(name)] = rng.uniform(low, high)
    return Shape(*(float(v) for v in values))


def caption(category: int, colour: int | None = None, bits=(None, None, None), direction: int | None = None,
            background: int | None = None, prefix: str = "a", decoy: str | None = None) -> str:
    """'a red table with long legs, a tall back and no arms on white, seen from the left'."""
    words = [prefix] + ([COLOUR_NAMES[colour]] if colour is not None else []) + [CATEGORIES[category]]
    if decoy:
        words.append(decoy)
    parts = [names[bit] for (_, names), bit in zip(COARSE_WORDS.values(), bits) if bit is not None]
    if parts:
        words.append("with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]))
    if background is not None:
        words.append(BACKGROUND_WORDS[background])
    text = " ".join(words)
    if direction is not None:
        text += ", seen from the " + DIRECTIONS[direction]
    return text


def caption_words() -> list[str]:
    """Every word a ToyWorld 2 caption can use (the tokenizer keeps each as one token)."""
    text = " ".join([*PREFIXES, *DECOYS, *COLOUR_NAMES, *DIRECTIONS, *CATEGORIES, *BACKGROUND_WORDS,
                     *(w for _, names in COARSE_WORDS.values() for w in names), "with and seen from the"])
    return list(dict.fromkeys(text.replace(",", " , ").split()))


def training_caption(rng: np.random.Generator, data: dict, index: int, keep: float = 0.8, decoy: float = 0.2) -> str:
    """A caption of training image `index`, each phrase kept with probability `keep`; the
    category is always named (it is the noun every prompt of the framework has)."""
    bits = coarse_bits(data["shape"][index])
    clear = coarse_clear(data["shape"][index])
    named = [int(b) if c and rng.random() < keep else None for b, c in zip(bits, clear)]
    category, colour, direction = (int(v) for v in data["classes"][index])
    return caption(category, colour if rng.random() < keep else None, named,
                   direction if rng.random() < keep else None,
                   int(data["background"][index]) if rng.random() < keep else None,
                   prefix=PREFIXES[rng.integers(len(PREFIXES))],
                   decoy=DECOYS[rng.integers(len(DECOYS))] if rng.random() < decoy else None)


def render_set(objects: int, views: int, resolution: int, seed: int, held_out: bool | None = False,
               progress=None) -> dict:
    """Objects (categories in turn) at random cameras and background levels -> images uint8
    [N,H,W,3], masks bool [N,H,W], classes int64 [N,3] (category, colour, direction), shape
    float32 [N,6], background int64 [N], cameras float32 [N,3], object int64 [N].
    held_out: False draws no HELD_OUT_COMBOS shape, True only those, None anything."""
    rng = np.random.default_rng([seed, 23, {False: 0, True: 1, None: 2}[held_out]])
    out = {k: [] for k in ("images", "masks", "classes", "shape", "background", "cameras", "object")}
    for index in range(objects):
        category, colour = index % len(CATEGORIES), int(rng.integers(len(COLOURS)))
        while True:
            shape = sample_shape(rng)
            values = np.array([getattr(shape, n) for n in SHAPE_PARAMS])
            if held_out is None or is_held_out(category, values) == held_out:
                break
        obj = WorldObject(CATEGORIES[category], shape, COLOURS[COLOUR_NAMES[colour]])
        for _ in range(views):
            camera = sample_camera(rng)
            background = int(rng.integers(len(BACKGROUNDS)))
            image, mask = render(obj, *camera, resolution, background, int(rng.integers(1 << 30)))
            out["images"].append(image)
            out["masks"].append(mask)
            out["classes"].append((category, colour, direction_bin(camera[0])))
            out["shape"].append(values)
            out["background"].append(background)
            out["cameras"].append(camera)
            out["object"].append(index)
        if progress is not None:
            progress(1)
    types = {"images": np.uint8, "masks": bool, "classes": np.int64, "shape": np.float32,
             "background": np.int64, "cameras": np.float32, "object": np.int64}
    return {k: np.array(v, dtype=types[k]) for k, v in out.items()}


def pretraining_data(objects: int, views: int, scorer_objects: int, resolution: int, seed: int, progress=None):
    """(training set without HELD_OUT_COMBOS, scorer set of other objects with every combination)."""
    train = render_set(objects, views, resolution, seed, held_out=False, progress=progress)
    scorer = render_set(scorer_objects, views, resolution, seed + 10_000, held_out=None, progress=progress)
    return train, scorer


# -- scoring the base model ---------------------------------------------------------------------------
def combo_prompts(combos, seeds: int, rng_seed: int = 0):
    """(category, legs, back, arms) combos x 8 directions x seeds, palette colours in turn, plain
    background -> (prompts, seeds, truth: category [N], colour [N], direction [N], bits [N,3])."""
    prompts, seed_list, truth = [], [], {"category": [], "colour": [], "direction": [], "bits": []}
    for c, (category, *bits) in enumerate(combos):
        category = CATEGORIES.index(category)
        for direction in range(len(DIRECTIONS)):
            for s in range(seeds):
                colour = (c + direction + s) % len(COLOURS)
                prompts.append(caption(category, colour, bits, direction, background=0))
                seed_list.append(rng_seed + 1000 * c + 10 * direction + s)
                for key, value in zip(truth, (category, colour, direction, bits)):
                    truth[key].append(value)
    return prompts, seed_list, {k: np.array(v) for k, v in truth.items()}


def score_against(scorer, images: torch.Tensor, truth: dict) -> dict:
    """Accuracy of category, colour, direction and each coarse word asked for."""
    predicted = scorer.predict(images)
    bits = coarse_bits(predicted["shape"].numpy())
    out = {n: round(float((predicted[n].numpy() == truth[n]).mean()), 4) for n in ("category", "colour", "direction")}
    for i, name in enumerate(COARSE_NAMES):
        out[name] = round(float((bits[:, i] == truth["bits"][:, i]).mean()), 4)
    return out


def evaluate_base_model(model_dir: str | Path, seeds: int = 2, steps: int = 20, guidance_scale: float = 4.0,
                        grid: str | Path | None = None) -> dict:
    """Generate from prompts naming held-out and seen (category, shape) combinations at every
    direction; read category, colour, direction and the coarse words back with the scorer."""
    from guided_concepts.toyworld.evaluate import generate, load_pipeline
    from guided_concepts.toyworld.world2_scorer import load_scorer2
    pipe = load_pipeline(model_dir)
    scorer = load_scorer2(Path(model_dir) / "scorer")
    metrics = {"world": "toyworld2", "guidance_scale": guidance_scale, "sample_steps": steps,
               "chance": {"category": 0.25, "colour": round(1 / len(COLOURS), 4), "direction": 0.125,
                          **{name: 0.5 for name in COARSE_NAMES}}}
    rows = []
    for split, combos in (("held_out", HELD_OUT_COMBOS), ("seen", SEEN_COMBOS)):
        prompts, seed_list, truth = combo_prompts(combos, seeds)
        images = generate(pipe, prompts, seed_list, steps, guidance_scale)
        for c, (category, *bits) in enumerate(combos):       # one row per combination: its 8 directions
            first = c * len(DIRECTIONS) * seeds
            label = f"{'held out' if split == 'held_out' else 'seen'}: {caption(CATEGORIES.index(category), None, bits)}"
            rows.append((label, images[first:first + len(DIRECTIONS) * seeds:seeds]))
        metrics[f"{split}_accuracy"] = score_against(scorer, images, truth)
        per_category = {}
        for c, (category, *_) in enumerate(combos):
            keep = truth["category"] == CATEGORIES.index(category)
            per_category[category] = score_against(scorer, images[torch.from_numpy(keep)],
                                                   {k: v[keep] for k, v in truth.items()})
        metrics[f"{split}_by_category"] = per_category
    if grid is not None:
        labelled_grid(rows, grid, columns=[f"from the {d}" for d in DIRECTIONS])
    metrics["held_out_prompts"] = [caption(CATEGORIES.index(c), None, bits) for c, *bits in HELD_OUT_COMBOS]
    return metrics


def labelled_grid(rows: list, path, columns: list[str], scale: int = 2, label_width: int = 330) -> None:
    """rows: (label, images [N,3,H,W] in [0,1]) -> a PNG: each row's label at its left, the column
    names on top, images upscaled `scale` times (nearest)."""
    from PIL import Image, ImageDraw
    h, w = rows[0][1].shape[-2:]
    cell_h, cell_w = h * scale + 4, w * scale + 4
    canvas = Image.new("RGB", (label_width + cell_w * len(columns), 16 + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_width + j * cell_w + 2, 2), name.replace("from the ", ""), fill="black")
    for i, (label, images) in enumerate(rows):
        draw.text((4, 16 + i * cell_h + cell_h // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            picture = Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(picture, (label_width + j * cell_w + 2, 16 + i * cell_h + 2))
    canvas.save(path)


def cross_category_renders(scorer, shapes_per_pair: int = 24, resolution: int = 48, seed: int = 0) -> dict:
    """For every ordered pair (A, B): shapes drawn from A's pretraining distribution rendered as B,
    at random cameras and backgrounds; -> {"A->B": share the scorer reads as B}."""
    rng = np.random.default_rng([seed, 29])
    out = {}
    for a in range(len(CATEGORIES)):
        shapes = []
        while len(shapes) < shapes_per_pair:
            shape = sample_shape(rng)
            if not is_held_out(a, np.array([getattr(shape, n) for n in SHAPE_PARAMS])):
                shapes.append(shape)
        for b, name in enumerate(CATEGORIES):
            images = []
            for shape in shapes:
                camera = sample_camera(rng)
                image, _ = render(WorldObject(name, shape, COLOURS[COLOUR_NAMES[int(rng.integers(len(COLOURS)))]]),
                                  *camera, resolution, int(rng.integers(len(BACKGROUNDS))), int(rng.integers(1 << 30)))
                images.append(image)
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
            out[f"{CATEGORIES[a]}->{name}"] = round(float((scorer.predict(pixels)["category"] == b).float().mean()), 4)
    return out

