"""The worlds `python -m toyworld pretrain --world NAME` can pretrain on: what each renders, how it
captions, how its scorer is trained and how its base model is scored. The registry drives the
CLI's choices; pretrain.py's VAE, UNet and export stages are the same for every world.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class World:
    caption_words: Callable[[], list]
    data: Callable            # (config, resolution, progress) -> (training set, scorer set), dicts of arrays
    caption: Callable         # (rng, training set, index, keep) -> str
    train_scorer: Callable    # (scorer set, config, log) -> (write(folder), summary)
    evaluate: Callable        # (model_dir, seeds, steps, guidance_scale, grid) -> metrics
    defaults: dict = field(default_factory=dict)   # PretrainConfig values this world changes
    combination: Callable | None = None   # (training set) -> [N] ints: the attribute combination of each image


# -- ToyWorld 1: chairs, arms and back as two bits ---------------------------------------------------
def _data1(c, resolution, progress):
    from guided_concepts.toyworld.world import render_set
    train = render_set(c.chairs, c.views, resolution, c.seed, held_out=False, progress=progress)
    # Scorer chairs: other geometries, every attribute combination (held-out ones included).
    scorer = render_set(c.scorer_chairs, 8, resolution, c.seed + 10_000, held_out=False, progress=progress)
    extra = render_set(max(1, c.scorer_chairs // 5), 8, resolution, c.seed + 20_000, held_out=True)
    extra["chair"] += c.scorer_chairs          # chair ids stay unique across the two sets
    return train, {k: np.concatenate([scorer[k], extra[k]]) for k in scorer}


def _caption1(rng, data, index, keep):
    from guided_concepts.toyworld.world import random_caption
    return random_caption(rng, dict(zip(("colour", "arms", "back", "direction"), data["labels"][index])), keep=keep)


def _scorer1(data, c, log):
    from guided_concepts.toyworld import scorer as scoring
    model, summary = scoring.train_scorer(data, steps=c.scorer_steps, seed=c.seed, log=log)
    return (lambda folder: scoring.save_scorer(model, folder)), summary


def _evaluate1(model_dir, **options):
    from guided_concepts.toyworld.evaluate import evaluate_base_model
    return evaluate_base_model(model_dir, **options)


def _words1():
    from guided_concepts.toyworld.world import caption_words
    return caption_words()


# -- ToyWorld 2: four categories, one continuous shape space, backgrounds ----------------------------
def _data2(c, resolution, progress):
    from guided_concepts.toyworld.world2_pretraining import pretraining_data
    return pretraining_data(c.chairs, c.views, c.scorer_chairs, resolution, c.seed, progress)


def _caption2(rng, data, index, keep):
    from guided_concepts.toyworld.world2_pretraining import training_caption
    return training_caption(rng, data, index, keep=keep)


def _scorer2(data, c, log):
    """Trains on 90% of the scorer objects; the other 10% (unseen shapes, every combination) give
    the accuracy file shipped beside the weights, per attribute and per background level. Then
    every ordered category pair: A's shapes rendered as B, read as B?"""
    from tqdm.auto import tqdm

    from guided_concepts.toyworld.world2_pretraining import cross_category_renders
    from guided_concepts.toyworld.world2_scorer import save_scorer2, train_and_measure
    model, report = train_and_measure(data, steps=c.scorer_steps, seed=c.seed,
                                      progress=lambda r: tqdm(r, desc="scorer"))
    report["cross_category_renders"] = cross_category_renders(model, resolution=data["images"].shape[1], seed=c.seed)
    log(f"[scorer] held-out renders: {json.dumps(report['held_out']['all'])}")

    def write(folder: Path):
        save_scorer2(model, folder)
        (folder / "accuracy.json").write_text(json.dumps(report, indent=1))
    return write, {"held_out": report["held_out"]["all"],
                   "cross_category_min": min(report["cross_category_renders"].values())}


def _evaluate2(model_dir, **options):
    from guided_concepts.toyworld.world2_pretraining import evaluate_base_model
    return evaluate_base_model(model_dir, **options)


def _combination2(data):
    from guided_concepts.toyworld.world2_pretraining import coarse_bits
    bits = coarse_bits(data["shape"])                                   # [N,3]
    return data["classes"][:, 0] * 8 + bits @ np.array([4, 2, 1])       # category x (legs, back, arms)


def _words2():
    from guided_concepts.toyworld.world2_pretraining import caption_words
    return caption_words()


WORLDS = {
    "toyworld": World(_words1, _data1, _caption1, _scorer1, _evaluate1),
    # 48 px: the scorer's category accuracy 0.92 / 0.96 / 0.975 at 32 / 48 / 64 px for 1x / 2.4x /
    # 5.9x its training time (docs/toyworld2/README.md).
    "toyworld2": World(_words2, _data2, _caption2, _scorer2, _evaluate2,
                       defaults={"sizes": {"resolution": 48}, "unet_steps": 8000, "foreground_weight": 3.0, "scorer_chairs": 2000,
                                 "scorer_steps": 3000},
                       combination=_combination2),
}
