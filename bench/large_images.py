"""Reading large photos: every read decodes the file (before), or the first read decodes it and
later ones reuse the resized copy (ObjectViewsDataset's cache, now the default).

    python -m bench.large_images                      # 4 views of 4000x3000 JPEG + PNG mask, 64 px

Prints seconds per item for the first pass and for a second pass (a second epoch), with the cache
off (cache_bytes=0: the old behaviour) and on, and their ratio, measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from guided_concepts.objectdata import ObjectViewsDataset, scan_objects


def write_object(folder: Path, views: int, width: int, height: int) -> None:
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for v in range(views):
        pixels = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(folder / "views" / f"{v:03d}.jpg", quality=90)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{v:03d}.png")


def seconds_per_item(dataset) -> float:
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - started) / len(dataset)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--size", default="4000x3000")
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        write_object(Path(tmp) / "photo", args.views, width, height)
        started = time.perf_counter()
        records = scan_objects(Path(tmp), resolution=args.resolution)
        scan = (time.perf_counter() - started) / args.views
        result = {"size": args.size, "views": args.views, "resolution": args.resolution, "scan_s_per_view": round(scan, 3)}
        for label, cache in (("every_read_decodes", 0), ("decoded_once", 2 << 30)):
            dataset = ObjectViewsDataset(records, args.resolution, flip_prob=0.0, mask_set_size=4, cache_bytes=cache)
            result[label] = {"first_pass_s_per_item": round(seconds_per_item(dataset), 3),
                             "second_pass_s_per_item": round(seconds_per_item(dataset), 4)}
        before, after = result["every_read_decodes"], result["decoded_once"]
        result["second_pass_speedup"] = round(before["second_pass_s_per_item"] / max(after["second_pass_s_per_item"], 1e-6), 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
