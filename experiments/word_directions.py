"""Where a factor lives in a trained word: is there a shared direction for it, and does the encoder
put each chair on the right side of it? (The diagnosis of the open arms gap of the swap matrix.)

    python -m experiments.word_directions --run runs/swap_matrix/run [--targets FILE]

For a binary factor of ToyWorld's objects (arms, back; on ToyWorld 2 legs, back, arms): the direction d = mean word of the chairs
with it minus mean word of those without (training chairs), and
  - side: the share of training and held-out chairs whose word lies on their true side of the
    midpoint along d (how well the encoder perceives the factor);
  - oracle: held-out words moved by +-alpha*d/2 with the *true* sign, generated with "a chair in
    the shape of *s" and read back (does the UNet act on d at all?);
  - stretch: held-out words pushed away from the mean word by gamma (a stronger word, no labels);
  - with --targets (tune.py --targets): cosine between d in the encoder's and in the tuned words.
Writes OUT/word_directions.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from guided_concepts import generate
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.toyworld.probes import encode_word, own_word_accuracy, truth_of, world_of
from guided_concepts.objectdata import scan_objects
from guided_concepts.rundata import resolve_data_root


def read_back(system, cfg, world, scorer, words: torch.Tensor, truths: list, seeds: int) -> dict:
    """"a chair in the shape of *s" with each word [N, 1, D], `seeds` samples each -> accuracy per shape factor."""
    rows = own_word_accuracy(system, cfg, world, list(range(len(truths))), truths, lambda i: words[i], seeds, 20, 4.0,
                             scorer)
    return {f: rows[f]["accuracy"] for f in world.shape_factors}


def on_norm(words: torch.Tensor, norm: float) -> torch.Tensor:
    return words * (norm / words.norm(dim=-1, keepdim=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--targets", type=Path, help="tune.py --targets file of this run (optional)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", type=Path, help="default: <run>/word_directions.json")
    args = p.parse_args(argv)
    system, cfg = generate.load_run(args.run)
    records = scan_objects(resolve_data_root(cfg.data.root))
    n_train = len(records) - cfg.data.holdout
    truths = [truth_of(r.root) for r in records]
    world = world_of([r.root for r in records])
    words = torch.stack([encode_word(system, cfg, "shape", r.root)[0] for r in records])      # [N, D]
    norm = float(words.norm(dim=-1).mean())
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    held, held_truths = words[n_train:], truths[n_train:]
    mean = words[:n_train].mean(0)
    result = {"run": str(args.run),
              "encoder": read_back(system, cfg, world, scorer, held[:, None], held_truths, args.seeds)}
    for factor in world.binary_factors:
        has = torch.tensor([world.value(t, factor) for t in truths]).bool()
        train, labels = words[:n_train], has[:n_train]
        direction = train[labels].mean(0) - train[~labels].mean(0)                              # [D]
        middle = (train[labels].mean(0) + train[~labels].mean(0)) / 2
        side = ((words - middle) @ direction > 0) == has
        row = {"direction_norm": float(direction.norm()), "side_train": float(side[:n_train].float().mean()),
               "side_held_out": float(side[n_train:].float().mean()),
               "held_out_projection": [round(float(x), 3) for x in (held - middle) @ direction / direction.norm()],
               "held_out_truth": [int(x) for x in has[n_train:]]}
        for alpha in (1.0, 2.0):
            sign = has[n_train:].float()[:, None] * 2 - 1
            moved = on_norm(held + alpha * sign * direction / 2, norm)
            row[f"oracle_x{alpha:g}"] = read_back(system, cfg, world, scorer, moved[:, None], held_truths, args.seeds)[factor]
        if args.targets:
            from safetensors.torch import load_file
            tuned = load_file(str(args.targets))
            names = [r.name for r in records[:n_train] if f"shape/{r.name}" in tuned]
            target = torch.stack([tuned[f"shape/{n}"][0] for n in names])
            mask = torch.tensor([world.value(truth_of(r.root), factor) for r in records[:n_train] if r.name in names]).bool()
            tuned_direction = target[mask].mean(0) - target[~mask].mean(0)
            row["cosine_with_tuned_direction"] = float(torch.nn.functional.cosine_similarity(direction, tuned_direction, dim=0))
            row["tuned_direction_norm"] = float(tuned_direction.norm())
        result[factor] = row
    for gamma in (1.5, 2.0, 3.0):
        result[f"stretch_x{gamma:g}"] = read_back(system, cfg, world, scorer,
                                                  on_norm(mean + gamma * (held - mean), norm)[:, None], held_truths,
                                                  args.seeds)
    out = args.out or args.run / "word_directions.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
