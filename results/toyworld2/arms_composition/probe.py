"""Which words of the held-out chair prompt take its arms away? Chair prompts that name arms with
both, one or none of the other two shape words; the scorer reads arms (and legs, back) back.
python results/toyworld2/arms_composition/probe.py MODEL [MODEL ...] > results.json"""
import json
import sys

import numpy as np
import torch

from guided_concepts.toyworld.evaluate import generate, load_pipeline
from guided_concepts.toyworld.world2_pretraining import COARSE_NAMES, coarse_bits, combo_prompts
from guided_concepts.toyworld.world2_scorer import load_scorer2

torch.set_num_threads(2)
PROMPTS = {   # (legs, back, arms); None = not named
    "short legs, tall back, arms (held out)": (0, 1, 1),
    "tall back, arms": (None, 1, 1),
    "short legs, arms": (0, None, 1),
    "arms": (None, None, 1),
    "long legs, tall back, arms (seen)": (1, 1, 1),
    "short legs, low back, arms (seen)": (0, 0, 1),
}
out = {}
for model in sys.argv[1:]:
    pipe, scorer = load_pipeline(model), load_scorer2(f"{model}/scorer")
    rows = {}
    for name, bits in PROMPTS.items():
        prompts, seeds, _ = combo_prompts([("chair", *bits)], seeds=4)
        images = generate(pipe, prompts, seeds, 20, 4.0)                    # [32,3,H,W]
        read = coarse_bits(scorer.predict(images)["shape"].numpy())         # [32,3]
        rows[name] = {f"{n} drawn": round(float(read[:, i].mean()), 3) for i, n in enumerate(COARSE_NAMES)}
        rows[name]["prompt"] = prompts[0]
    out[model] = rows
print(json.dumps(out, indent=1))
