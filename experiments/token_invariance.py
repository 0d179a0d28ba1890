"""Does each word carry only its own factor? Train shape+pose runs with and without the
consistency losses, then measure on the synthetic chairs:

- pose probe: median azimuth error on held-out objects, with *p's head fed keypoints (or the
  image) instead of the camera (fed the camera, recovery is trivial);
- *s: variance across one object's views ÷ variance across objects (small = view-invariant);
- *p: variance across objects at one camera ÷ variance across cameras (small = object-invariant).

    python -m experiments.token_invariance --steps 300 --out runs/invariance
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from guided_concepts import generate
from guided_concepts import train
from guided_concepts.metrics import variance_ratio
from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
from guided_concepts.rundata import resolve_data_root


def measure(run_dir: Path) -> dict:
    system, cfg = generate.load_run(run_dir)
    records = scan_objects(resolve_data_root(cfg.data.root))
    holdout = min(cfg.data.holdout, len(records) - 1)
    out = {}
    # Held-out objects are few (2 by default): ratios across objects are reported on all objects.
    for split, recs in (("train", records[:len(records) - holdout]), ("held_out", records[len(records) - holdout:]),
                        ("all_objects", records)):
        # The set encoder sees random subsets of 1..V views, so its within-object spread is real.
        dataset = ObjectViewsDataset(recs, cfg.data.resolution, flip_prob=0.0, random_set_size=True,
                                     mask_set_size=cfg.concepts["shape"].max_views)
        batch = collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            encoded = system.encode(batch)
        cameras = torch.tensor([hash((round(a, 1), round(e, 1))) for a, e in batch["camera"][:, :2].tolist()])
        if split != "held_out":
            out[f"{split}/shape_view_over_object_variance"] = variance_ratio(encoded["shape"].embeds, batch["object_index"])
            out[f"{split}/pose_object_over_camera_variance"] = variance_ratio(encoded["pose"].embeds, cameras)
        errors = system.heads["pose"].azimuth_error(encoded["pose"].extras["camera_pred"], batch["camera"])
        out[f"{split}/pose_probe_median_azimuth_error_deg"] = errors.median().item()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pose-inputs", default="keypoints", help="what *p's head reads: keypoints or image")
    p.add_argument("--out", default="runs/invariance")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    variants = {"consistency_on": [], "consistency_off": ["--set", "losses.shape.view_consistency_weight=0",
                                                          "--set", "losses.pose.consistency_weight=0"]}
    results = {}
    for name, extra in variants.items():
        argv = ["--tokens", "shape,pose", "--name", name, "--set", f"run.output_dir={args.out}",
                "--set", f"train.steps={args.steps}", "--set", "train.sample_every=0",
                "--set", f"concepts.pose.inputs=[{args.pose_inputs}]", *extra]
        run_dir = Path(args.out) / name
        if not (run_dir / "checkpoints").is_dir() or args.overwrite:
            train.main(argv + (["--overwrite"] if args.overwrite else []))
        results[name] = measure(run_dir)
    Path(args.out, "token_invariance.json").write_text(json.dumps(results, indent=1))
    keys = sorted(next(iter(results.values())))
    print(f"{'metric':55s} " + " ".join(f"{n:>16s}" for n in results))
    for k in keys:
        print(f"{k:55s} " + " ".join(f"{results[n][k]:16.4f}" for n in results))
    return results


if __name__ == "__main__":
    main()
