"""Per-object tuning (tune.py) on a held-out object: denoising loss before/after K steps for the
encoder run (heads + E4T adapters) and for textual inversion from the initializer word (same
steps and lr), artefact size and tuning time; plus a FLOP estimate per tuning step for SD 1.5 at
512 px (counted on a meta-device SD 1.5 UNet, no weights needed).

    python -m experiments.tuning_costs --out runs/tuning
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from guided_concepts import train
from guided_concepts import tune
from guided_concepts.objectdata import ensure_default_data, scan_objects


def sd15_unet_flops(batch: int = 1) -> float:
    """Forward FLOPs of SD 1.5's UNet at 512 px (64x64 latents), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.floor import sd15_modules   # run from the repository root
    unet = sd15_modules()[0]
    with torch.device("meta"):
        x, e = torch.randn(batch, 4, 64, 64, dtype=unet.dtype), torch.randn(batch, 77, 768, dtype=unet.dtype)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500] * batch), e)
    return float(counter.get_total_flops())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="domain pre-training steps")
    p.add_argument("--tune-steps", type=int, default=15)
    p.add_argument("--out", default="runs/tuning")
    args = p.parse_args(argv)
    run = Path(args.out) / "domain"
    if not (run / "checkpoints").is_dir():
        train.main(["--name", "domain", "--set", f"run.output_dir={args.out}", "--set", "adapters.kind=e4t",
                    "--set", f"train.steps={args.steps}", "--set", "train.sample_every=0"])
    held_out = scan_objects(ensure_default_data())[-1].root
    results = {mode: tune.tune_object(run, held_out, args.tune_steps, Path(args.out) / f"object_{mode}", mode)
               for mode in ("encoder", "textual_inversion")}
    forward = sd15_unet_flops()
    # A tuning step: UNet forward + backward (~2x forward) through the frozen UNet to the words and
    # adapters, batch of tune.batch_size; VAE encode and text encoder are small next to it.
    batch = results["encoder"]["batch_size"]
    results["sd15_flops_per_tuning_step"] = {"unet_forward_per_sample": forward, "batch_size": batch,
                                             "forward_backward_total": 3 * forward * batch}
    Path(args.out, "tuning_costs.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
