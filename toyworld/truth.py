"""Ground truth for experiments, per world: what an object folder's meta.json says it is, how to
render it, how its factors are written in caption words, and how the world's scorer reads each
factor back from a generated image. Experiments (swap matrix, ladder) take a `WorldTruth` from
`truth_for(meta)` and never ask which world they are in.

A factor is "followed" by a sample when the scorer reads the donor's value (classes), or a value
nearer the donor's than the recipient's (ToyWorld 2's continuous shape parameters).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class WorldTruth:
    factors: tuple[str, ...]              # what the scorer reads, besides silhouette and direction
    shape_factors: tuple[str, ...]        # the factors the shape word owns (besides silhouette)
    binary_factors: tuple[str, ...]       # the shape factors that are yes/no (a word direction each)
    resolution: int = 32                  # the world's image size (renders for references)

    def truth_of(self, meta: dict):
        raise NotImplementedError

    def render(self, truth, azimuth: float, elevation: float, distance: float, resolution: int):
        raise NotImplementedError

    def noun(self, truth) -> str:
        raise NotImplementedError

    def shape_words(self, truth) -> str:
        """The shape written in caption words ('with arms and a tall back')."""
        raise NotImplementedError

    def colour_word(self, truth) -> str:
        raise NotImplementedError

    def with_shape_of(self, recipient, donor):
        """The recipient object given the donor's shape: what "a {recipient's noun} in the shape
        of *s" should look like when *s came from the donor. One category: the donor itself."""
        return donor

    def load_scorer(self, model_dir: Path):
        raise NotImplementedError

    def read(self, scorer, images: torch.Tensor) -> dict:
        """images [N,3,H,W] in [0,1] -> factor -> per-image values (and "direction")."""
        raise NotImplementedError

    def value(self, truth, factor: str):
        return getattr(truth, factor)

    def silhouette(self, scorer, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] in [0,1] -> the object's pixels bool [N,H,W]: far from white (plain backgrounds)."""
        from guided_concepts.toyworld.scorer import silhouette
        return silhouette(images)

    def follows(self, factor: str, read, donor, recipient) -> bool | None:
        """None when donor and recipient agree on the factor (nothing to follow)."""
        a, b = self.value(donor, factor), self.value(recipient, factor)
        if a == b:
            return None
        return read == a

    def correct(self, factor: str, read, truth) -> bool | None:
        """Whether a read value is the truth's; None when the truth has no clear value to match."""
        return read == self.value(truth, factor)

    def flags(self, factor: str, reads, truth) -> list[bool]:
        """correct() of each read value, leaving out what cannot be judged."""
        return [flag for flag in (self.correct(factor, v, truth) for v in reads) if flag is not None]

    # One instance is as good as another: caches keyed on a world hit across calls.
    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self).__name__)


class ToyWorld1Truth(WorldTruth):
    factors = ("arms", "back", "colour")
    shape_factors = ("arms", "back")
    binary_factors = ("arms", "back")
    resolution = 32

    def truth_of(self, meta):
        from guided_concepts.toyworld.world import toy_chair_from_meta
        return toy_chair_from_meta(meta)

    def render(self, truth, azimuth, elevation, distance, resolution):
        from guided_concepts.toyworld.world import render
        return render(truth, azimuth, elevation, distance, resolution)

    def noun(self, truth):
        return "chair"

    def shape_words(self, truth):
        from guided_concepts.toyworld.world import caption
        return caption(arms=truth.arms, back=truth.back, prefix="").replace(" chair ", "").strip()

    def colour_word(self, truth):
        from guided_concepts.toyworld.world import COLOUR_NAMES
        return COLOUR_NAMES[truth.colour]

    def load_scorer(self, model_dir):
        from guided_concepts.toyworld.scorer import load_scorer
        return load_scorer(Path(model_dir) / "scorer")

    def read(self, scorer, images):
        from guided_concepts.toyworld.world import COLOUR_NAMES
        predicted = scorer.predict(images)
        out = {k: [int(v) for v in predicted[k]] for k in ("arms", "back", "direction")}
        out["colour"] = [COLOUR_NAMES[int(c)] for c in predicted["colour"]]
        return out

    def value(self, truth, factor):
        return self.colour_word(truth) if factor == "colour" else getattr(truth, factor)


class ToyWorld2Truth(WorldTruth):
    """Shape factors: the three coarse words (read by threshold) and the six continuous parameters
    (followed when the read value is nearer the donor's)."""
    resolution = 48

    def __init__(self):
        from guided_concepts.toyworld.world2 import SHAPE_PARAMS
        from guided_concepts.toyworld.world2_pretraining import COARSE_NAMES
        self.params = SHAPE_PARAMS
        self.coarse = COARSE_NAMES
        self.shape_factors = (*COARSE_NAMES, *SHAPE_PARAMS)
        self.binary_factors = COARSE_NAMES
        self.factors = (*self.shape_factors, "colour", "category")

    def truth_of(self, meta):
        from guided_concepts.toyworld.world2 import WorldObject
        return WorldObject.from_meta(meta)

    def render(self, truth, azimuth, elevation, distance, resolution):
        from guided_concepts.toyworld.world2 import render
        return render(truth, azimuth, elevation, distance, resolution)

    def noun(self, truth):
        return truth.category

    def _bits(self, truth):
        from guided_concepts.toyworld.world2_pretraining import coarse_bits
        return coarse_bits(np.array([getattr(truth.shape, n) for n in self.params]))

    def _clear(self, truth, factor: str) -> bool:
        """A coarse word is only judged where pretraining would have written it (off its threshold)."""
        from guided_concepts.toyworld.world2_pretraining import coarse_clear
        return bool(coarse_clear(np.array([getattr(truth.shape, n) for n in self.params]))[self.coarse.index(factor)])

    def shape_words(self, truth):
        """The coarse words pretraining would caption this shape with (the clear ones)."""
        from guided_concepts.toyworld.world2_pretraining import caption
        bits = tuple(int(b) if self._clear(truth, f) else None for b, f in zip(self._bits(truth), self.coarse))
        return caption(0, bits=bits, prefix="").split(" ", 2)[-1] if any(b is not None for b in bits) else ""

    def colour_word(self, truth):
        from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES
        return next(n for n in COLOUR_NAMES if tuple(COLOURS[n]) == tuple(truth.colour))

    def with_shape_of(self, recipient, donor):
        from dataclasses import replace
        return replace(recipient, shape=donor.shape)

    def load_scorer(self, model_dir):
        from guided_concepts.toyworld.world2_scorer import load_scorer2
        return load_scorer2(Path(model_dir) / "scorer")

    def read(self, scorer, images):
        from guided_concepts.toyworld.world import COLOUR_NAMES
        from guided_concepts.toyworld.world2 import CATEGORIES
        from guided_concepts.toyworld.world2_pretraining import coarse_bits
        predicted = scorer.predict(images)
        shape = predicted["shape"].numpy()                                        # [N, 6]
        out = {n: shape[:, i].tolist() for i, n in enumerate(self.params)}
        out.update({n: coarse_bits(shape)[:, i].tolist() for i, n in enumerate(self.coarse)})
        out["colour"] = [COLOUR_NAMES[int(c)] for c in predicted["colour"]]
        out["direction"] = [int(d) for d in predicted["direction"]]
        out["category"] = [CATEGORIES[int(c)] for c in predicted["category"]]
        return out

    def silhouette(self, scorer, images):
        """The scorer's mask head: on a floor or among blocks "not white" is no silhouette."""
        return scorer.predict(images.float())["mask"]

    def value(self, truth, factor):
        if factor in self.params:
            return float(getattr(truth.shape, factor))
        if factor in self.coarse:
            return int(self._bits(truth)[self.coarse.index(factor)])
        if factor == "colour":
            return self.colour_word(truth)
        if factor == "category":
            return truth.category
        raise KeyError(factor)

    def follows(self, factor, read, donor, recipient):
        a, b = self.value(donor, factor), self.value(recipient, factor)
        if factor in self.params:
            if abs(a - b) < 0.2:              # too close to tell apart with the scorer's error (MAE ~0.05-0.15)
                return None
            return abs(read - a) < abs(read - b)
        if factor in self.coarse and not (self._clear(donor, factor) and self._clear(recipient, factor)):
            return None
        return None if a == b else read == a

    def correct(self, factor, read, truth):
        if factor in self.params:
            return abs(read - self.value(truth, factor)) < 0.2
        if factor in self.coarse and not self._clear(truth, factor):
            return None
        return read == self.value(truth, factor)


WORLD_TRUTHS = {"toyworld": ToyWorld1Truth, "toyworld2": ToyWorld2Truth}    # meta.json shape.<key> -> its world


def ground_truth_scorer(model_dir: str | Path):
    """(WorldTruth, scorer) when a model folder ships a ToyWorld scorer (scorer/), else None."""
    folder = Path(model_dir) / "scorer"
    if not (folder / "model.safetensors").exists():
        return None
    world = WORLD_TRUTHS[json.loads((folder / "config.json").read_text()).get("world", "toyworld")]()
    return world, world.load_scorer(model_dir)


def ground_truth_scores(world: WorldTruth, scorer, images: torch.Tensor, truth, prompt: str, camera=None,
                        true_mask=None) -> dict:
    """Per-sample ground-truth scores of framework samples of one ToyWorld object, as means.

    images [N,3,H,W] in [0,1]; truth the reference object's (its meta.json); camera (azimuth, ...)
    and true_mask [H,W] bool of the view the pose word came from, if any. -> "gt/<factor>" for each
    shape factor (carried by the shape word), "gt/colour" when the prompt names one palette colour,
    "gt/direction" and "gt/silhouette_iou" when a camera is given."""
    from guided_concepts.toyworld.scorer import mask_iou
    from guided_concepts.toyworld.world import COLOUR_NAMES, direction_bin
    read = world.read(scorer, images.float())
    out = {f"gt/{f}": float(np.mean(flags)) for f in world.shape_factors if (flags := world.flags(f, read[f], truth))}
    named = [name for name in COLOUR_NAMES if f" {name} " in f" {prompt} "]
    if len(named) == 1:
        out["gt/colour"] = float(np.mean([c == named[0] for c in read["colour"]]))
    if camera is not None:
        out["gt/direction"] = float(np.mean([d == direction_bin(float(camera[0])) for d in read["direction"]]))
    if true_mask is not None:
        masks = torch.as_tensor(true_mask, dtype=torch.bool)[None].expand(len(images), -1, -1)
        out["gt/silhouette_iou"] = float(mask_iou(world.silhouette(scorer, images.float()), masks).mean())
    return out


def truth_for(meta: dict) -> WorldTruth:
    """The world an object folder's meta.json comes from (its ground-truth key under shape)."""
    shape = meta.get("shape", {})
    for key, world in WORLD_TRUTHS.items():
        if key in shape:
            return world()
    raise ValueError("meta.json: no ToyWorld ground truth (shape.toyworld or shape.toyworld2); "
                     "experiments that read factors back need ToyWorld objects")


def truth_of_folder(folder: Path):
    """-> (WorldTruth, the object's truth)."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    world = truth_for(meta)
    return world, world.truth_of(meta)
