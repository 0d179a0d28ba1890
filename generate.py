"""Generate with a trained run: encode reference objects into the words, then sample any prompt.

    python generate.py --run runs/default --prompt "a red chair in the shape of *s" \
        --shape-from my_chairs/chair_001 --num 4
    python generate.py --prompt "a red chair with arms, seen from the left"   # the base model alone
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from guided_concepts.argtypes import finite_float, non_negative_float, positive_int, word_strength, device as device_type
from guided_concepts.checkpointing import latest_checkpoint, load_adapters, load_heads, load_state
from guided_concepts.concepts import CONCEPTS
from guided_concepts.configs.schema import ConfigError
from guided_concepts.rundata import load_run_config
from guided_concepts.objectdata import DataError, ObjectViewsDataset, collate, scan_objects
from guided_concepts.overlays import attention_grid
from guided_concepts.system import GuidedConcepts, build_system, load_backbone_for, to_device
from guided_concepts.tokens import TokenError, check_prompt
from guided_concepts.cli import entry_point
from guided_concepts import sampling


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             artefact: str | Path | None = None) -> tuple:
    """-> (system with the run's heads, config). `checkpoint` defaults to the latest one;
    `artefact` (a tune.py output folder) replaces the heads and adapters with the tuned ones."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = Path(artefact) if artefact else (Path(checkpoint) if checkpoint else latest_checkpoint(run_dir))
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    backbone = load_backbone_for(cfg)
    system = build_system(cfg, backbone)
    if artefact:
        origin = f"artefact {ckpt}; this run's model is {cfg.model.name!r}"
    else:
        record = load_state(ckpt)  # a checkpoint's state.json must read (CheckpointError names it)
        trained_on = f" trained on model {record['model']!r} per its state.json" if record.get("model") else ""
        origin = f"checkpoint {ckpt}{trained_on}; this run's model is {cfg.model.name!r}"
    heads = load_heads(ckpt)      # generation needs no optimizer state
    system.load_trainable_state(heads, origin)
    if system.adapters is not None:       # the run's UNet adapters (E4T domain tuning)
        state = load_adapters(ckpt)
        if state is not None:
            check_fits(state, system.adapters.state_dict(), "adapters", origin)
            system.adapters.load_state_dict(state)
    for module in backbone.frozen_modules():   # the backbone is not a submodule: move it too
        module.to(device)
    system.to(device).eval()
    return system, cfg


def check_fits(saved: dict, own: dict, what: str, origin: str) -> None:
    """ValueError naming the first tensor of `saved` that does not fit `own` (a state dict): torch's
    own error is a many-line RuntimeError."""
    for key, value in saved.items():
        if key not in own:
            raise ValueError(f"checkpoint {what} do not fit this model: the checkpoint has {key}, which this "
                             f"model lacks ({origin})")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint {what} do not fit this model: {key} has shape {list(value.shape)} in "
                             f"the checkpoint, {list(own[key].shape)} here ({origin})")
    missing = [k for k in own if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {what} do not fit this model: this model has {missing[0]}, which the "
                         f"checkpoint lacks ({origin})")


def check_sampling(num: int, steps: int, guidance_scale: float, diversity: float = 0.0) -> None:
    """The numbers generate() takes (the command line's flags check the same with argparse)."""
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 1:
        raise ValueError(f"num: must be a whole number >= 1, got {num!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: must be a whole number >= 1, got {steps!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: must be a finite number, got {guidance_scale!r}")
    if not (math.isfinite(diversity) and diversity >= 0):
        raise ValueError(f"diversity: must be a finite number >= 0, got {diversity!r}")


def concept_reference_batch(folder, view: int, cfg, name: str, needs: tuple[str, ...] | None = None) -> dict:
    """reference_batch for concept `name` of a run's config: its needs (unless given), and the mask
    set its head reads."""
    required = CONCEPTS[name].concept.requirements(cfg.concepts[name])
    set_size, set_resolution = required.mask_set
    return reference_batch(folder, view, cfg.data.resolution, required.data if needs is None else needs,
                           set_size=set_size, set_resolution=set_resolution)


def reference_batch(folder: str | Path, view: int, resolution: int, needs: tuple[str, ...],
                    set_size: int = 0, set_resolution: int = 64) -> dict:
    """One object's view as a batch of 1 (validated like training data); with set_size, also
    the object's masks (up to set_size views) for set encoders."""
    records = scan_objects(folder, require_masks="mask" in needs, require_cameras="camera" in needs,
                           require_keypoints="keypoints" in needs)
    if len(records) != 1:
        raise DataError(f"{folder}: expected one object folder (with views/), found {len(records)} objects")
    dataset = ObjectViewsDataset(records, resolution, flip_prob=0.0, mask_set_size=set_size if "mask_set" in needs else 0,
                                 mask_set_resolution=set_resolution, set_shading="mask_set_shading" in needs)
    if not 0 <= view < len(dataset):
        raise DataError(f"{folder}: view {view} out of range, the object has {len(dataset)} views")
    return collate([dataset[view]])


def add_source_args(parser) -> None:
    """--<name>-from for every concept, and each concept's own value flags (e.g. --pose)."""
    for name, entry in CONCEPTS.items():
        entry.concept.add_source_args(parser)
        parser.add_argument(f"--{name}-from", dest=f"{name}_from", help=f"object folder whose view gives the {name} word")


def sources_from_args(args, names) -> dict:
    """concept -> its source: `--<name>-from` (an object folder) or the concept's own flags (e.g.
    --pose azimuth=30); both for one word is an error."""
    sources = {}
    for name in names:
        concept = CONCEPTS[name].concept
        folder, given = getattr(args, f"{name}_from", None), concept.source_from_args(args)
        if folder and given is not None:
            raise ValueError(f"give either {' or '.join(concept.value_flags)} or --{name}-from, not both")
        if folder or given is not None:
            sources[name] = folder if folder else given
    return sources


def generate(system: GuidedConcepts, cfg, prompt: str, sources: dict[str, str | Path | dict], num: int = 4,
             seed: int = 0, steps: int = 20, guidance_scale: float = 5.0, view: int = 0,
             diversity: float = 0.0, options: dict | None = None, strengths: dict[str, float] | None = None):
    """-> (reference image [3, H, W], images [num, 3, H, W], maps [num, C, h, w] or None).

    sources: concept -> object folder, or what a concept's own flags gave (e.g. a camera dict for
    the pose). Only the words the prompt uses need a source; each may come from a different object.
    diversity: tau for stochastic words (the shape set encoder): 0 = the mean, 1 = the trained
    spread, > 1 more varied; sample i draws its own code (seed + i).
    options: the concepts' generation switches (their add_generation_args flags), e.g. {"shape_source":
    "image"}: *s from one RGB view instead of the object's masks.
    strengths: concept -> how far each word moves from its initializer word (system.with_strength;
    1 as learned, > 1 amplified).
    """
    check_sampling(num, steps, guidance_scale, diversity)
    options = dict(options or {})
    check_prompt(prompt, system.table.specs.values())
    used = [n for n in system.tokens if re.search(rf"(?<![\w*]){re.escape(system.heads[n].config.token)}(?!\w)", prompt)]
    strengths = dict(strengths or {})
    strange = [n for n in strengths if n not in system.tokens]
    if strange:
        raise ValueError(f"--strength {strange[0]}=...: not a word of this run ({', '.join(system.tokens)})")
    unused = [n for n in strengths if n not in used]
    if unused:
        raise ValueError(f"--strength {unused[0]}=...: the prompt does not use that word (it uses: "
                         f"{', '.join(used) or 'none'})")
    missing = [n for n in used if n not in sources]
    if missing:
        raise ValueError(f"no reference for {', '.join(missing)}: pass --{missing[0]}-from <object folder>")
    # Each word is encoded from its own object, so words of different objects can be mixed.
    device = next(system.backbone.unet.parameters()).device
    for name in system.tokens:
        system.heads[name].apply_generation_options(options)
    batches, reference = {}, None
    for name in used:
        concept = CONCEPTS[name].concept
        batch = concept.source_batch(sources[name], cfg.concepts[name])
        if batch is None:                 # an object folder
            needs = concept.requirements(cfg.concepts[name], at_generation=True, options=options).data
            batch = concept_reference_batch(sources[name], view, cfg, name, needs)
            reference = batch["image"][0] if reference is None else reference
        batches[name] = to_device(batch, device)
    if reference is None:
        size = cfg.data.resolution
        reference = torch.ones(3, size, size)
    images, maps = [], []
    for i in range(num):   # one seed per sample, so sample i is the same whatever `num` is
        with torch.no_grad():
            encoded = {}
            for name, batch in batches.items():
                concept = system.heads[name]
                concept.diversity = diversity
                concept.noise_generator = torch.Generator().manual_seed(seed + i)
                encoded[name] = concept.encode(batch)
        encoded = sampling.with_strength(system, encoded, strengths)
        image, attn = sampling.sample(system, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed + i, encoded=encoded)
        images.append(image)
        maps.append(attn)
    maps = torch.cat(maps) if maps[0] is not None else None
    return (reference.float().cpu() + 1) / 2, torch.cat(images), maps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (runs/<name>); without it, the base model --model samples the prompt")
    p.add_argument("--model", default="toyworld", help="base model without --run: 'toyworld' (shipped), 'tiny', a folder or hub id")
    p.add_argument("--prompt", required=True, help="any prompt using the run's words, e.g. 'a chair in the shape of *s'")
    add_source_args(p)
    for entry in CONCEPTS.values():
        entry.concept.add_generation_args(p)
    p.add_argument("--diversity", type=non_negative_float, default=0.0,
                   help="tau: 0 = the shape code's mean (faithful), 1 = the trained spread, >1 more varied")
    p.add_argument("--strength", type=word_strength, action="append", default=[], metavar="NAME=VALUE",
                   help="move a word from its initializer by VALUE times what it learned: 1 as learned, "
                        ">1 amplified (e.g. shape=1.5; repeat for several words)")
    p.add_argument("--view", type=int, default=0, help="which view of the reference object")
    p.add_argument("--num", type=positive_int, default=4, help="samples (seeds seed, seed+1, …)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    p.add_argument("--guidance-scale", type=finite_float, default=5.0)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    p.add_argument("--artefact", help="a per-object artefact from tune.py (tuned heads + adapters)")
    p.add_argument("--out", help="output PNG (default: <run>/samples/generated.png)")
    p.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.out and (Path(args.out).is_dir() or Path(args.out).suffix.lower() not in Image.registered_extensions()):
        p.error(f"--out {args.out}: expected an image file name (.png, .jpg, ...), not "
                + ("a folder" if Path(args.out).is_dir() else f"{Path(args.out).suffix or 'no extension'}"))
    if args.run is None:
        return sample_base_model(args)
    try:
        given = sources_from_args(args, CONCEPTS)      # the flags' values are checked before the model loads
        system, cfg = load_run(args.run, args.checkpoint, args.device, args.artefact)
        sources = {n: source for n, source in given.items() if n in system.tokens}
        reference, images, maps = generate(system, cfg, args.prompt, sources, args.num, args.seed, args.steps,
                                           args.guidance_scale, args.view, args.diversity, vars(args),
                                           dict(args.strength))
    except (ConfigError, DataError, TokenError, ValueError) as err:
        sys.exit(f"error: {err}")
    out = Path(args.out) if args.out else Path(args.run) / "samples" / "generated.png"
    names = [system.heads[n].config.token for n in system.attention_concepts]
    write_output(out, attention_grid(reference[None].repeat(len(images), 1, 1, 1), images, maps, names).save)
    print(f"wrote {out}")
    return out


def write_output(out: Path, write) -> None:
    """write(out), its folder made first; a folder that takes no files (a read-only checkout, a
    full disk) is one line naming it and --out."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except OSError as err:
        sys.exit(f"error: {err.filename or out}: cannot write the samples ({err.strerror or err}); "
                 "pass --out FILE to write them elsewhere")


def sample_base_model(args) -> Path:
    """No run: sample the prompt with the base model's own words (a row of --num seeds)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from guided_concepts.backbone.load import resolve_model_path
    from guided_concepts.toyworld.evaluate import save_grid
    if re.search(r"(?<![\w])\*\w", args.prompt):
        sys.exit(f"error: --prompt {args.prompt!r} uses a learned word; pass --run with the run that trained it")
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    try:
        path = resolve_model_path(args.model)
        sd_only = {} if Path(path, "text_encoder_2").is_dir() else {"safety_checker": None, "requires_safety_checker": False}
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, **sd_only)    # SD or SDXL
    except (OSError, ValueError) as err:
        sys.exit(f"error: --model {args.model}: {err}")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num)]
    images = pipe([args.prompt] * args.num, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  generator=generators, output_type="pt").images.float().cpu()
    out = Path(args.out) if args.out else Path("runs") / "generated.png"
    write_output(out, lambda path: save_grid(images, args.num, path, scale=max(1, 256 // images.shape[-1])))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    entry_point(main)
