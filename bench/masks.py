"""Segmenters against true masks: ToyWorld 2 objects at 128 px on each background level.

    python -m bench.masks [--scenes 12]

Prints IoU (min / mean) per segmenter and level; docs/prepare/README.md keeps the table.
"""
from __future__ import annotations

import argparse

import numpy as np

from guided_concepts.prepare.examples import world2_scenes
from guided_concepts.prepare.masks import grabcut_mask, iou, threshold_mask
from guided_concepts.toyworld.world2 import BACKGROUNDS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=12, help="scenes per background level")
    args = p.parse_args(argv)
    print("| segmenter | " + " | ".join(BACKGROUNDS) + " |")
    print("|---|" + "---|" * len(BACKGROUNDS))
    for name, segment in (("threshold", threshold_mask), ("grabcut", grabcut_mask)):
        cells = []
        for level in range(len(BACKGROUNDS)):
            scores = [iou(segment(image), mask) for image, mask in world2_scenes(level, args.scenes)]
            cells.append(f"{min(scores):.2f} / {np.mean(scores):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
