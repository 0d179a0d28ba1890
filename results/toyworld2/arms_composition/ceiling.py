"""The scorer's arms reading on true renders of chairs with arms, by (legs, back): what a perfect
generator would score. Raw renders and after the VAE's encode/decode (what a sample can at best be).
python results/toyworld2/arms_composition/ceiling.py MODEL > ceiling.json"""
import json
import sys

import numpy as np
import torch

from guided_concepts.toyworld.evaluate import load_pipeline
from guided_concepts.toyworld.pretrain import pixels
from guided_concepts.toyworld.world import COLOURS, COLOUR_NAMES
from guided_concepts.toyworld.world2 import WorldObject, render, sample_camera
from guided_concepts.toyworld.world2_pretraining import coarse_bits, shape_with_bits
from guided_concepts.toyworld.world2_scorer import load_scorer2

torch.set_num_threads(2)
model = sys.argv[1]
vae, scorer = load_pipeline(model).vae, load_scorer2(f"{model}/scorer")
out = {}
for legs, back in ((0, 1), (0, 0), (1, 1), (1, 0)):
    rng = np.random.default_rng([legs, back, 7])
    images = []
    for i in range(64):                                  # 64 chairs with arms, one plain view each
        obj = WorldObject("chair", shape_with_bits(rng, (legs, back, 1)), COLOURS[COLOUR_NAMES[i % len(COLOURS)]])
        images.append(render(obj, *sample_camera(rng), 48, 0, i)[0])
    x = pixels(np.stack(images))                                                    # [64,3,48,48] in [-1,1]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample                 # [64,3,48,48]
    name = f"{'long' if legs else 'short'} legs, {'tall' if back else 'low'} back, arms"
    out[name] = {kind: round(float(coarse_bits(scorer.predict(imgs)["shape"].numpy())[:, 2].mean()), 3)
                 for kind, imgs in (("render", (x + 1) / 2), ("vae", (decoded / 2 + 0.5).clamp(0, 1)))}
print(json.dumps(out, indent=1))
