"""What a step costs beside the peer: diffusers' `examples/textual_inversion/textual_inversion.py`
against this project's closest thing to plain textual inversion (`--tokens shape`,
`concepts.shape.encoder: none`, every shape loss at 0, no triplets), side by side.

    python -m bench.peer_step_cost --peer /path/to/diffusers/examples/textual_inversion/textual_inversion.py \
        --torchvision /path/to/a/torchvision/install [--rounds 6 --steps 41]

Same interpreter, same ToyWorld object (chair_000's 8 views, 32 px), batch 4, lr 5e-3, one thread
each, the two commands interleaved in every round. Each side runs 1 step and --steps steps: the
per-step time is (T_steps - T_1) / (steps - 1), and T_1 is start-up plus one step. The peer script
is not shipped here (fetch it from diffusers); it imports torchvision only for its transforms, so
a torchvision whose compiled ops do not load beside the CPU torch wheel is enough once
`torchvision._meta_registrations` is stubbed (done here, in the peer's process only).
--ours-set adds --set overrides to our side (e.g. concepts.shape.encoder=set for the encoder's cost).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_PRELUDE = ("import sys, types, runpy; sys.modules['torchvision._meta_registrations'] = "
                "types.ModuleType('torchvision._meta_registrations'); sys.argv = [{script!r}] + {args!r}; "
                "runpy.run_path({script!r}, run_name='__main__')")


def one_object(work: Path) -> Path:
    """ToyWorld's first chair, alone in a data folder (both sides read its 8 views)."""
    from guided_concepts.rundata import resolve_data_root
    source = sorted(p for p in resolve_data_root("toyworld").iterdir() if p.is_dir())[0]
    root = work / "data"
    if not root.exists():
        shutil.copytree(source, root / source.name)
    return root / source.name


def peer_command(peer: Path, model: Path, views: Path, steps: int, out: Path) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(views),
            "--placeholder_token", "<s*>", "--initializer_token", "object", "--resolution", "32",
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "5e-3",
            "--lr_warmup_steps", "0", "--output_dir", str(out), "--report_to", "wandb", "--seed", "0",
            "--checkpointing_steps", "100000", "--save_steps", "100000"]
    return [sys.executable, "-c", PEER_PRELUDE.format(script=str(peer), args=args)]


def ours_command(data: Path, steps: int, out: Path, extra: list[str]) -> list[str]:
    sets = ["data.holdout=0", "data.triplets=false", "train.batch_size=4", f"train.steps={steps}",
            "train.sample_every=0", "train.checkpoint_every=100000", "train.log_every=100000",
            "concepts.shape.encoder=none", "concepts.shape.lr=5e-3",
            "losses.shape.view_consistency_weight=0", "losses.shape.identity_weight=0", "losses.shape.kl_weight=0",
            "losses.shape.align_weight=0", f"data.root={data}", f"run.output_dir={out.parent}", *extra]
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "base.yaml"),
            "--tokens", "shape", "--name", out.name, *[x for s in sets for x in ("--set", s)]]


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        sys.exit(f"error: {' '.join(command[:3])} ... failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", type=Path, required=True, help="diffusers' examples/textual_inversion/textual_inversion.py")
    p.add_argument("--torchvision", type=Path, help="a folder holding a torchvision package (put on the peer's path)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=41, help="steps of the long run (the short one is 1 step)")
    p.add_argument("--ours-set", action="append", default=[], help="extra --set for our side")
    p.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = p.parse_args(argv)
    if not args.peer.is_file():
        sys.exit(f"error: --peer {args.peer}: no such file")
    from guided_concepts.backbone.load import resolve_model_path
    model = Path(resolve_model_path("toyworld"))
    work = Path(tempfile.mkdtemp(prefix="peer-step-cost-"))
    obj = one_object(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    peer_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.torchvision or ""), env.get("PYTHONPATH", "")]))}
    rows = []
    for r in range(args.rounds):
        times = {}
        sides = [("peer", peer_env), ("ours", env)] if r % 2 == 0 else [("ours", env), ("peer", peer_env)]
        for side, side_env in sides:
            for steps in (1, args.steps):
                out = work / "runs" / f"{side}_{r}_{steps}"
                command = (peer_command(args.peer, model, obj / "views", steps, out) if side == "peer"
                           else ours_command(obj.parent, steps, out, args.ours_set))
                times[(side, steps)] = timed(command, side_env)
        row = {side: {"one_step_s": times[(side, 1)],
                      "per_step_ms": 1000 * (times[(side, args.steps)] - times[(side, 1)]) / (args.steps - 1)}
               for side in ("peer", "ours")}
        row["ratio"] = row["ours"]["per_step_ms"] / row["peer"]["per_step_ms"]
        rows.append(row)
        print(f"round {r + 1}: peer {row['peer']['per_step_ms']:.1f} ms/step, ours {row['ours']['per_step_ms']:.1f} "
              f"(x{row['ratio']:.2f}); 1-step runs {row['peer']['one_step_s']:.2f} s / {row['ours']['one_step_s']:.2f} s",
              flush=True)
    median = lambda side, key: statistics.median(r[side][key] for r in rows)    # noqa: E731
    ratios = [r["ratio"] for r in rows]
    summary = {"peer_ms": median("peer", "per_step_ms"), "ours_ms": median("ours", "per_step_ms"),
               "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "peer_one_step_s": median("peer", "one_step_s"), "ours_one_step_s": median("ours", "one_step_s"),
               "ours_set": args.ours_set, "rounds": rows}
    print(f"median: peer {summary['peer_ms']:.1f} ms/step, ours {summary['ours_ms']:.1f} ms/step, ratio "
          f"{summary['ratio_median']:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); 1-step runs "
          f"{summary['peer_one_step_s']:.2f} s / {summary['ours_one_step_s']:.2f} s")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
