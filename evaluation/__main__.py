"""python -m evaluation RUN [RUN ...] [--objects OBJ ...] [--num 4] [--clip PATH] [--out DIR]

Generates N samples per (reference object, prompt) with fixed seeds for each run and writes
rows.csv, results.json and report.md (with plots) to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from guided_concepts.argtypes import positive_int, device as device_type
from guided_concepts.configs.schema import ConfigError
from guided_concepts.evaluation.image_metrics import ClipScorer
from guided_concepts.evaluation.report import write_report
from guided_concepts.evaluation.runner import DEFAULT_PROMPTS, EvalSettings, evaluate_run, write_results
from guided_concepts.objectdata import DataError
from guided_concepts.cli import entry_point


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--objects", nargs="*", help="reference object folders (default: each run's held-out objects)")
    p.add_argument("--prompt", action="append", metavar="KEY=TEMPLATE",
                   help="extra/replacement prompt, e.g. 'blue=a blue {category} {phrases}' "
                        f"(defaults: {', '.join(DEFAULT_PROMPTS)})")
    p.add_argument("--num", type=positive_int, default=4, help="samples per prompt (seeds seed..seed+num-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    p.add_argument("--features", help="image features 'module:function' (images -> [N, F]); default: pixels")
    p.add_argument("--segmenter", help="segmenter 'module:function' (images -> masks); default: plain background")
    p.add_argument("--clip", help="CLIP model path or hub id for editability (CLIP-T); skipped when absent")
    p.add_argument("--out", default="runs/evaluation", help="output folder")
    p.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    prompts = dict(DEFAULT_PROMPTS)
    for item in args.prompt or []:
        key, sep, template = item.partition("=")
        if not sep:
            sys.exit(f"error: --prompt {item!r}: expected KEY=TEMPLATE")
        prompts[key] = template
    try:
        settings = EvalSettings(prompts=prompts, num_samples=args.num, seed=args.seed, steps=args.steps,
                                objects=args.objects, features=args.features, segmenter=args.segmenter,
                                clip=args.clip, device=args.device)
        clip = ClipScorer(args.clip)
        results = [evaluate_run(run, settings, clip) for run in args.runs]
    except (ConfigError, DataError, ValueError) as err:
        sys.exit(f"error: {err}")
    out = Path(args.out)
    write_results(results, out)
    report = write_report(results, out)
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    entry_point(main)
