"""Where the appearance word sits in the prompt, measured (docs/toyworld2/README.md, "The appearance
word's place"). For a trained run: *a encoded from each of the 16 held-out objects, 4 seeds, prompts
with *a alone or beside *s (another object's) and *p; the scorer reads the colour back.

    PYTHONPATH=. python results/toyworld2/appearance_position.py RUN          # trailing "with the appearance of *a"
    PRE=1 PYTHONPATH=. python results/toyworld2/appearance_position.py RUN    # *a on the noun
"""
import sys, torch, numpy as np
from guided_concepts import generate
from guided_concepts.backbone.load import resolve_model_path
from guided_concepts.evaluation.runner import held_out_objects
from experiments.swap_matrix import encode_word, camera_of, truth_of, world_of, sample_batch
run = sys.argv[1]
system, cfg = generate.load_run(run)
objects = held_out_objects(cfg, run); truths = [truth_of(f) for f in objects]; world = world_of(objects)
scorer = world.load_scorer(resolve_model_path(cfg.model.name))
A = {i: encode_word(system, cfg, "appearance", f) for i, f in enumerate(objects)}
S = {i: encode_word(system, cfg, "shape", f) for i, f in enumerate(objects)}
P = {d: encode_word(system, cfg, "pose", camera_of(d)) for d in range(8)}
n = len(objects); cols = [world.value(t, "colour") for t in truths]
print("colours", cols)
def run_case(name, template, use_s=None, use_p=False, seeds=4):
    prompts, emb = [], {"appearance": [], "shape": [], "pose": []}
    for i in range(n):
        for s in range(seeds):
            prompts.append(template.format(noun=world.noun(truths[i])))
            emb["appearance"].append(A[i]); emb["shape"].append(S[(i + 1) % n if use_s == "other" else i]); emb["pose"].append(P[(i + s) % 8])
    emb = {k: torch.stack(v) for k, v in emb.items() if (k == "appearance" or (k == "shape" and use_s) or (k == "pose" and use_p))}
    imgs = sample_batch(system, prompts, emb, seed=1000, steps=20, guidance=4.0)
    read = world.read(scorer, imgs)["colour"]
    truth = np.repeat(cols, seeds)
    other = np.repeat([cols[(i + 1) % n] for i in range(n)], seeds)
    print(f"{name:40s} colour follows *a {np.mean(np.array(read) == truth):.2f}  other's {np.mean(np.array(read) == other):.2f}  read {dict(zip(*np.unique(read, return_counts=True)))}", flush=True)
import os
if os.environ.get("PRE"):
    run_case("*a first alone", "a *a {noun}")
    run_case("*a first, *s(other) *p", "a *a {noun} in the shape of *s with pose *p", use_s="other", use_p=True)
    run_case("*a last alone", "a {noun} *a")
else:
    run_case("*a only", "a {noun} with the appearance of *a")
    run_case("*a first", "a *a {noun}")
    run_case("*s(other) *p *a", "a {noun} in the shape of *s with pose *p with the appearance of *a", use_s="other", use_p=True)
