"""ToyWorld command line.

    python -m toyworld pretrain --out runs/toyworld [--world toyworld2] [--resume | --overwrite] [--set key=value ...]
    python -m toyworld evaluate --model toyworld/weights        # base-model attribute accuracy (--guidance-scale 7.5)
    python -m toyworld objects --world toyworld2 --out data/tw2 --objects 200 --background floor
    python -m toyworld objects --as-other-categories data/tw2 --out data/tw2_as_others   # for tune.py --more-views
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from guided_concepts.argtypes import non_negative_float, positive_int
from guided_concepts.cli import entry_point
from guided_concepts.toyworld.pretrain import STAGES
from guided_concepts.toyworld.worlds import WORLDS

PRETRAIN_ENTRIES = ("config.json", "stages", "checkpoints", "model", "timings.json", ".lock", ".*.tmp", ".*.old")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train VAE, text encoder, UNet and scorer; export an SD folder")
    pre.add_argument("--out", type=Path, required=True, help="run folder (model/ is the result)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out with its own config")
    pre.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pre.add_argument("--world", choices=WORLDS, default=None,
                     help="the world to render and pretrain on (its defaults, then --set); default toyworld")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a PretrainConfig key (sizes.KEY for model sizes)")
    pre.add_argument("--stop-after", choices=STAGES, help="stop after this stage")
    pre.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    ev = sub.add_parser("evaluate", help="score a ToyWorld model's samples on held-out attribute prompts")
    ev.add_argument("--model", default="toyworld", help="'toyworld' (the shipped weights) or a model folder")
    ev.add_argument("--seeds", type=positive_int, default=2)
    ev.add_argument("--grid", type=Path, default=None, help="write the held-out samples as a PNG grid")
    ev.add_argument("--steps", type=positive_int, default=20, help="DDIM sampling steps")
    ev.add_argument("--guidance-scale", type=non_negative_float, default=4.0, help="classifier-free guidance")
    obj = sub.add_parser("objects", help="write object folders with ground truth (views, masks, meta.json)")
    obj.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    obj.add_argument("--world", choices=WORLDS, default="toyworld")
    obj.add_argument("--objects", type=positive_int, default=48, help="objects (ToyWorld 2: categories in turn)")
    obj.add_argument("--views", type=positive_int, default=8, help="views per object (cameras of the shared pool)")
    obj.add_argument("--background", choices=("plain", "floor", "clutter"), default="plain", help="ToyWorld 2 only")
    obj.add_argument("--seed", type=int, default=0)
    obj.add_argument("--as-other-categories", type=Path, metavar="DATA", help="ToyWorld 2: instead, write every "
                     "object folder of DATA again as each other category (same shape, colour and cameras): "
                     "--out/<object>/<category>/, for tune.py --more-views")
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    if args.command == "pretrain":
        from guided_concepts.checkpointing import RunFolderError, clear_run_folder
        from guided_concepts.toyworld.pretrain import Pretraining, config_from_overrides
        config_file = args.out / "config.json"
        try:
            if args.resume:
                if not config_file.exists():
                    raise RunFolderError(f"{args.out}: --resume given but there is no {config_file.name}")
                if args.set:
                    raise ValueError("--resume continues with the run's own config.json; --set is not allowed")
                config = config_from_overrides([], json.loads(config_file.read_text()))
                if args.world and args.world != config.world:
                    raise ValueError(f"--world {args.world}: the run in {args.out} is on {config.world}; "
                                     "--resume continues it as it was")
            else:
                if any(item.split("=", 1)[0].strip() == "world" for item in args.set):
                    raise ValueError("--set world=...: choose the world with --world (it also sets that world's defaults)")
                config = config_from_overrides(args.set, world=args.world)
                if args.out.exists() and any(args.out.iterdir()):
                    if not args.overwrite:
                        raise RunFolderError(f"{args.out} already exists; pass --resume to continue it or "
                                             "--overwrite to replace it")
                    # Only a pretraining run's own files go, never a folder of anything else.
                    clear_run_folder(args.out, entries=PRETRAIN_ENTRIES, markers=("config.json",))
                args.out.mkdir(parents=True, exist_ok=True)
                config_file.write_text(json.dumps(asdict(config), indent=1))
        except (ValueError, RunFolderError) as error:
            parser.error(str(error))
        model = Pretraining(args.out, config).run(stop_after=args.stop_after)
        print(model)
        return 0

    if args.command == "objects":
        from guided_concepts.toyworld.world import write_toy_objects
        from guided_concepts.toyworld.world2 import BACKGROUNDS
        from guided_concepts.toyworld.world2_data import write_as_other_categories, write_world2_objects
        if args.as_other_categories:
            try:
                write_as_other_categories(args.as_other_categories, args.out)
            except (ValueError, FileExistsError) as error:
                parser.error(str(error))
            print(args.out)
            return 0
        if args.world == "toyworld" and args.background != "plain":
            parser.error("--background: ToyWorld 1's chairs are on white only; use --world toyworld2")
        try:
            if args.world == "toyworld":
                write_toy_objects(args.out, args.objects, args.views, seed=args.seed)
            else:
                write_world2_objects(args.out, args.objects, args.views, background=BACKGROUNDS.index(args.background),
                                     seed=args.seed)
        except (ValueError, FileExistsError) as error:
            parser.error(str(error))
        print(args.out)
        return 0

    from guided_concepts.backbone.load import resolve_model_path
    try:
        model = resolve_model_path(args.model)
        world = model_world(Path(model))
    except (ValueError, OSError) as error:
        parser.error(f"--model {args.model}: {error}")
    metrics = WORLDS[world].evaluate(model, seeds=args.seeds, steps=args.steps,
                                     guidance_scale=args.guidance_scale, grid=args.grid)
    print(json.dumps(metrics, indent=1))
    return 0


def model_world(model: Path) -> str:
    """The world a model folder was pretrained on: pretrain_config.json, else its scorer's config,
    else ToyWorld 1 (folders from before worlds were recorded)."""
    for source in (model / "pretrain_config.json", model / "scorer" / "config.json"):
        if source.is_file():
            world = json.loads(source.read_text()).get("world", "toyworld")
            if world not in WORLDS:
                raise ValueError(f"{source}: world {world!r} is not one of {', '.join(WORLDS)}")
            return world
    return "toyworld"


if __name__ == "__main__":
    entry_point(main)
