"""A quick probe of one setting: train on ToyWorld, then generate with each word alone and read its
factor back. What the ablation table of the swap-matrix work was measured with.

    python -m experiments.word_probe --name lr3 --steps 300 --tokens shape --set concepts.shape.lr=1e-3
    python -m experiments.word_probe --name oracle --tokens shape --oracle-shape      # true arms/back as the code

Per held-out chair: "a chair in the shape of *s" (arms, back), "a *a chair"
(colour); per direction: "a chair with pose *p" (direction), `--samples` each. Also the shape
word's spread across the held-out chairs (norm of the per-dimension std) and its mean norm: a
spread near 0 is the collapse (one word for every chair). Appends a line to OUT/results.jsonl.

--extra-chairs N also scores the object-level words on N ToyWorld chairs that no run trains on
(written like the run's data, same file size): 8 held-out chairs give arms a standard error near
0.15 between runs, 32 near 0.08. Standard errors (`*_se`) are over chairs, whose samples agree.

--tuned-steps N also scores the shape word after E4T's stage 2 (tune.py, N steps from the run's
heads on each chair's own views), on the same chairs: `arms_tuned`, `back_tuned`.

--oracle-shape replaces the shape encoder's code with the chair's true arms and back (+-1 in two
dimensions): it separates "the head and losses cannot make the word carry a clean input" from
"the encoder does not deliver the input".
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from guided_concepts import generate
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.evaluation.runner import held_out_objects
from guided_concepts.toyworld.probes import encode_word, truth_of, tuned_words, world_of
from guided_concepts.objectdata import scan_objects
from guided_concepts.prompts import render_prompt
from guided_concepts.rundata import resolve_data_root
from guided_concepts.objectdata.synthetic import ensure_generated
from guided_concepts.toyworld.truth import ToyWorld1Truth
from guided_concepts.toyworld.world import direction_bin, write_toy_objects
from guided_concepts import sampling


def use_oracle_shape_code():
    """Monkeypatch the shape head's code with the truth (for the diagnostic only)."""
    from guided_concepts.concepts import shape as shape
    attributes = {r.name: truth_of(r.root) for r in scan_objects(resolve_data_root("toyworld"))}

    def oracle_code(self, batch):
        rows = []
        for name in batch["object_name"]:
            code = torch.zeros(self.config.code_dim)
            code[0], code[1] = 2 * attributes[name].arms - 1, 2 * attributes[name].back - 1
            rows.append(code)
        return torch.stack(rows).to(batch["mask"].device), None, None
    shape.ShapeConcept.mask_code = oracle_code


def extra_chairs(cfg, count: int, cache: Path) -> list[Path]:
    """`count` ToyWorld chairs no run trains on (object seed 1), files as large as the run's data."""
    from PIL import Image
    first = min(resolve_data_root(cfg.data.root).glob("*/views/*"))
    size = Image.open(first).size[0]
    folder = ensure_generated(cache / f"extra_chairs_{count}_{size}px",
                              lambda out: write_toy_objects(out, num_objects=count, seed=1, resolution=size))
    return sorted(p for p in folder.iterdir() if p.is_dir())


def mean_and_se(per_chair: list[list[bool]]) -> tuple[float, float]:
    """Accuracy over all samples, standard error over chairs (one chair's samples mostly agree)."""
    per_chair = [c for c in per_chair if c]          # chairs with nothing judgeable do not count
    means = np.array([np.mean(c) for c in per_chair])
    return float(np.mean([x for c in per_chair for x in c])), float(means.std(ddof=1) / np.sqrt(len(means)))


@torch.no_grad()
def probe(run: Path, samples: int = 6, extra: int = 0, tuned_steps: int = 0) -> dict:
    system, cfg = generate.load_run(run)
    objects = held_out_objects(cfg, run)
    world = world_of(objects)
    if extra:
        if not isinstance(world, ToyWorld1Truth):
            raise ValueError("--extra-chairs writes ToyWorld 1 chairs; this run is on another world")
        objects = objects + extra_chairs(cfg, extra, run.parent)
    scorer = world.load_scorer(resolve_model_path(cfg.model.name))
    result = {}

    def shape_hits(read, truth) -> dict:
        return {f: world.flags(f, read[f], truth) for f in world.binary_factors}
    if "shape" in system.tokens:
        hits = {f: [] for f in world.binary_factors}
        for o, folder in enumerate(objects):
            truth = truth_of(folder)
            images = generate.generate(system, cfg, f"a {world.noun(truth)} {system.clauses['shape']}", {"shape": folder},
                                       samples, seed=100 * o, steps=20, guidance_scale=4.0)[1]
            for f, values in shape_hits(world.read(scorer, images), truth).items():
                hits[f].append(values)
        words = torch.stack([encode_word(system, cfg, "shape", f) for f in objects])
        for k, per_chair in hits.items():
            result[k], result[f"{k}_se"] = mean_and_se(per_chair)
        if tuned_steps:         # E4T's stage 2 on each scored chair, then the same prompt and seeds
            with torch.enable_grad():                     # tuning trains; the rest of the probe only samples
                words = tuned_words(run, objects, ["shape"], tuned_steps, run.parent / f"tuned_{run.name}")["shape"]
            tuned_hits = {f: [] for f in world.binary_factors}
            for o, folder in enumerate(objects):
                word = SimpleNamespace(embeds=words[o][None])
                truth = truth_of(folder)
                images = torch.cat([sampling.sample(system, [f"a {world.noun(truth)} {system.clauses['shape']}"], steps=20,
                                                  guidance_scale=4.0, seed=100 * o + k, encoded={"shape": word})[0]
                                    for k in range(samples)])                         # generate's seeds
                for f, values in shape_hits(world.read(scorer, images), truth).items():
                    tuned_hits[f].append(values)
            for k, per_chair in tuned_hits.items():
                result[f"{k}_tuned"], result[f"{k}_tuned_se"] = mean_and_se(per_chair)
        result["chairs"] = len(objects)
        result.update(shape_spread=float(words.std(0).norm()), shape_norm=float(words.norm(dim=-1).mean()))
    if "pose" in system.tokens:
        hits = []
        noun = world.noun(truth_of(objects[0]))
        for d in range(8):
            camera = {"azimuth": 45.0 * d, "elevation": 20.0, "distance": 2.5}
            images = generate.generate(system, cfg, f"a {noun} {system.clauses['pose']}", {"pose": camera}, samples,
                                       seed=10 * d, steps=20, guidance_scale=4.0)[1]
            hits += [v == direction_bin(45.0 * d) for v in world.read(scorer, images)["direction"]]
        result["direction"] = float(np.mean(hits))
    if "appearance" in system.tokens:
        hits = []
        for o, folder in enumerate(objects):
            truth = truth_of(folder)
            prompt = render_prompt("a {category}", world.noun(truth), {"appearance": system.clauses["appearance"]})
            images = generate.generate(system, cfg, prompt,
                                       {"appearance": folder}, samples, seed=10 * o, steps=20, guidance_scale=4.0)[1]
            hits.append([v == world.value(truth, "colour") for v in world.read(scorer, images)["colour"]])
        result["colour"], result["colour_se"] = mean_and_se(hits)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("runs/word_probe"))
    p.add_argument("--tokens", default="shape")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--tuned-steps", type=int, default=0, help="also score the shape word after N tune.py steps")
    p.add_argument("--extra-chairs", type=int, default=0, help="also score on this many unseen ToyWorld chairs")
    p.add_argument("--oracle-shape", action="store_true", help="the shape code is the chair's true arms and back")
    p.add_argument("--set", action="append", default=[], help="train.py --set for the run")
    args = p.parse_args(argv)
    from guided_concepts import train
    if args.oracle_shape:
        use_oracle_shape_code()
    started = time.time()
    run = args.out / args.name
    if not (run / "checkpoints").exists():
        train.main(["--config", str(Path(__file__).resolve().parent.parent / "configs" / "base.yaml"),
                    "--tokens", args.tokens, "--name", args.name, "--set", f"run.output_dir={args.out}",
                    "--set", f"train.steps={args.steps}", "--set", "train.sample_every=0",
                    *[x for item in args.set for x in ("--set", item)]])
    trained = time.time()
    result = {"name": args.name, "steps": args.steps, "tokens": args.tokens, "set": args.set,
              "oracle_shape": args.oracle_shape, **probe(run, args.samples, args.extra_chairs, args.tuned_steps),
              "train_s": round(trained - started), "eval_s": round(time.time() - trained)}
    print(json.dumps(result))
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
