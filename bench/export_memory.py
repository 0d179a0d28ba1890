"""Memory of the end-of-run token export as the number of objects grows: bounded batches (now)
against one batch of every object (before).

    python -m bench.export_memory --objects 500 2000      # tiny model, shape word, 64 px

Each (objects, batch) pair runs in its own process; it prints the peak resident memory the export
added over the process before it (MB), and the ratio one-batch / bounded for each object count.
The objects are links to one bundled chair, so the data costs no disk.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # KiB on Linux


def measure(objects: int, batch: int, root: Path) -> dict:
    """In this process: build the tiny shape system, then export `objects` objects."""
    import torch

    from guided_concepts.backbone import ensure_tiny_model, load_backbone
    from guided_concepts.concepts import CONCEPTS
    from guided_concepts.objectdata import ObjectViewsDataset, ensure_default_data, scan_objects
    from guided_concepts.system import GuidedConcepts
    from guided_concepts.validation import export_tokens
    torch.set_num_threads(2)
    data = root / f"data_{objects}"
    if not data.exists():
        data.mkdir()
        chair = sorted(ensure_default_data().iterdir())[0]
        for i in range(objects):
            os.symlink(chair, data / f"obj_{i:05d}")
    backbone = load_backbone(str(ensure_tiny_model()))
    system = GuidedConcepts(backbone, {n: CONCEPTS[n].config() for n in CONCEPTS},
                            {n: CONCEPTS[n].loss_config() for n in CONCEPTS}, ["shape"], None)
    dataset = ObjectViewsDataset(scan_objects(data), 64, flip_prob=0.0, mask_set_size=8)
    before = peak_mb()
    export_tokens(system, [dataset], root / f"run_{objects}_{batch}", "cpu", batch_size=batch)
    return {"objects": objects, "batch": batch, "peak_added_mb": round(peak_mb() - before, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--bound", type=int, default=64, help="the export's batch bound (validation.EXPORT_BATCH)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(int(args.child[0]), int(args.child[1]), Path(args.child[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.objects:
            for batch in (args.bound, n):           # bounded (now), one batch of all (before)
                out = subprocess.run([sys.executable, "-m", "bench.export_memory", "--child", str(n),
                                      str(batch), tmp], capture_output=True, text=True, check=True,
                                      cwd=Path(__file__).resolve().parent.parent)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
        for n in args.objects:
            bounded, whole = (next(r["peak_added_mb"] for r in rows if r["objects"] == n and r["batch"] == b)
                              for b in (args.bound, n))
            print(f"{n} objects: bounded {bounded} MB, one batch {whole} MB, ratio {whole / max(bounded, 0.1):.1f}x")


if __name__ == "__main__":
    main()
