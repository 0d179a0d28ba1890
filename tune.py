"""Per-object tuning (E4T stage 2): start from a domain run, encode a new object with its heads,
then tune the heads (and the UNet adapters, when the run has them) for a few steps on the
object's views. Writes a small artefact that generate.py loads.

    python tune.py --run runs/default --object my_chairs/chair_042            # 15 steps
    python generate.py --run runs/default --artefact runs/default/objects/chair_042 \
        --prompt "a red chair in the shape of *s" --shape-from my_chairs/chair_042

--targets tunes every training object of the run the same way and writes their words to one file;
training again with train.word_targets and losses.<concept>.target_weight pulls the encoder's
words toward them (the encoder learns what per-object tuning finds):

    python tune.py --run runs/default --targets runs/default/word_targets.safetensors

--fit FILE is HyperDreamBooth's regression phase after it: every object-level head (its encoder
and its MLP) is regressed onto FILE's words for the training objects (1 - cos, all of each
object's masks, batch norm statistics kept), and the result is written as a new run folder
(without the old heads' token files; export.py writes the fitted words):

    python tune.py --run runs/default --fit runs/default/word_targets.safetensors --out runs/default_fit
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from guided_concepts import generate
from guided_concepts.argtypes import positive_float, positive_int
from guided_concepts.concepts import CONCEPTS
from guided_concepts.checkpointing import RunFolderError, atomic_folder, atomic_write, check_overwritable
from guided_concepts.configs.schema import ConfigError, mask_set_options
from guided_concepts.objectdata import DataError, ObjectViewsDataset, collate, scan_objects
from guided_concepts.rundata import load_run_config, resolve_data_root, run_split
from guided_concepts.tokens.export import load_token, save_word
from guided_concepts.losses import word_target_loss
from guided_concepts.tokens.targets import load_word_targets, save_word_targets
from guided_concepts.cli import entry_point
from guided_concepts.prompts import prompts_for
from guided_concepts.objective import training_losses
from guided_concepts.backbone.latents import LatentCache

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def object_denoise_loss(system, batch: dict, prompts: list[str], latent_cache: LatentCache | None = None) -> float:
    """Mean denoising loss over the object's views at fixed timesteps and fixed noise."""
    values = []
    for t in EVAL_TIMESTEPS:
        terms = training_losses(system, batch, prompts, torch.Generator().manual_seed(t),
                                encoded=system.encode(batch), timesteps=t, latent_cache=latent_cache)
        values.append(terms["denoise"][1].mean().item())
    return sum(values) / len(values)


def shift_hue(images: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Each view's hue turned by its own random angle, up to `amount` of the colour circle either
    way. images [B, 3, H, W] in [-1, 1] -> same. Whites and greys keep their value."""
    from kornia.enhance import adjust_hue
    angles = (torch.rand(len(images), generator=generator) * 2 - 1) * amount * 2 * torch.pi   # [B] radians
    turned = adjust_hue((images.float() + 1) / 2, angles.to(images.device))
    return (turned * 2 - 1).to(images.dtype)


ARTEFACT_ENTRIES = ("heads.safetensors", "adapters.safetensors", "tokens", "lora", "artefact.json", ".*.tmp", ".*.old")


def check_artefact_folder(out_dir: Path, object_dir: Path) -> None:
    """--out is replaced whole when the artefact is written: it may be a new folder or an earlier
    artefact, never a folder of anything else, nor inside the object's own folder."""
    if _inside(out_dir, object_dir.parent):      # it would be read as an object of that data set next time
        raise ConfigError(f"--out {out_dir}: inside the object's data folder {object_dir.parent}; write the artefact "
                          "elsewhere (default: <run>/objects/<object>)")
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            check_overwritable(out_dir, object_dir, ARTEFACT_ENTRIES, markers=("artefact.json",))
        except RunFolderError as err:
            raise ConfigError(str(err).replace("--overwrite refused: not a run folder", "refused: not a tune.py "
                                               "artefact").replace("--name or run.output_dir", "--out")) from None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


def tune_object(run_dir, object_dir, steps: int | None = None, out_dir=None, mode: str = "encoder",
                overrides: dict | None = None, seed: int = 0, more_views=None) -> dict:
    """mode "encoder": tune the heads (+ adapters) from the run; "textual_inversion": the baseline,
    each word a free vector starting at its initializer word, same steps and lr.
    more_views: a folder of object folders that are more views of this object (the same object as
    another category or in another scene; each with its own meta.json, so each prompt names its own
    category); the words tune on all of them and are written from the object's own first view."""
    _check_counts({"steps": steps, **{k: v for k, v in (overrides or {}).items() if k in ("batch_size", "grad_accum")}})
    if out_dir is not None:
        check_artefact_folder(Path(out_dir), Path(object_dir))
    system, cfg = generate.load_run(run_dir)
    tc = cfg.tune
    for key, value in (overrides or {}).items():
        setattr(tc, key, value)
    try:
        tc.__post_init__()                       # the overrides obey the config's own checks
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_counts({"tune.steps": tc.steps if steps is None else None, "tune.batch_size": tc.batch_size,
                   "tune.grad_accum": tc.grad_accum})          # the run's own, where not overridden
    # A few views, encoded at every timestep and step: encode each once (a hue-shifted view is new).
    latent_cache = LatentCache() if tc.hue_jitter == 0 else None
    steps = tc.steps if steps is None else steps
    for name, changes in tc.losses.items():            # e.g. no mask loss while tuning (the seeds)
        if name in system.heads:
            for key, value in changes.items():
                if not hasattr(system.heads[name].loss_config, key):
                    raise ConfigError(f"tune.losses.{name}.{key}: no such loss setting")
                setattr(system.heads[name].loss_config, key, value)
    records = scan_objects(object_dir)
    if len(records) != 1:
        raise DataError(f"{object_dir}: expected one object folder (with views/)")
    if more_views is not None:
        records += scan_objects(more_views)         # scan_objects names a folder without objects
    mask_set = mask_set_options(cfg)
    views = ObjectViewsDataset(records, cfg.data.resolution, flip_prob=0.0, **mask_set)
    all_views = collate([views[i] for i in range(len(views))])
    prompts_all = prompts_for(all_views["category"], cfg.prompt.templates[:1], system.clauses, system.tokens, random.Random(0))

    params = []
    if mode == "textual_inversion":
        for concept in system.heads.values():
            with torch.no_grad():
                if concept.head.mlp is not None:
                    concept.head.mlp[-1].weight.zero_()
                    concept.head.mlp[-1].bias.zero_()
                concept.head.rows.copy_(system.table.initializer_rows[concept.name].expand_as(concept.head.rows))
            concept.head.fixed_norm = 0.0      # a free vector, as plain textual inversion has it
            concept.requires_grad_(False)
            concept.head.rows.requires_grad_(True)
            params.append(concept.head.rows)
        groups = [{"params": params, "lr": tc.lr}]
    elif mode == "encoder":
        groups = [{"params": [p for p in system.heads.parameters() if p.requires_grad], "lr": tc.lr}]
        adapters = getattr(system, "adapters", None)
        if adapters is not None and tc.train_adapters:
            adapters.set_trainable(True)
            groups.append({"params": adapters.parameters(), "lr": tc.adapter_lr})
    else:
        raise ValueError(f"mode must be 'encoder' or 'textual_inversion', got {mode!r}")
    before = object_denoise_loss(system.eval(), all_views, prompts_all, latent_cache)

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    training = ObjectViewsDataset(records, cfg.data.resolution, flip_prob=cfg.data.flip_prob, seed=seed,
                                  random_set_size=True, **mask_set)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    system.heads.train()
    for module in system.heads.modules():
        # Statistics across objects (a standardised shape code) are the domain run's: one
        # object's views cannot supply them, and batch statistics would erase the object.
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    system.heads.set_noise_generator(generator)
    started = time.time()
    for step in range(steps):
        for _ in range(tc.grad_accum):                   # explicit: tuning is sensitive to batch size
            indices = [rng.randrange(len(training)) for _ in range(tc.batch_size)]
            batch = collate([training[i] for i in indices])
            if tc.hue_jitter > 0:
                batch["image"] = shift_hue(batch["image"], tc.hue_jitter, generator)
            prompts = prompts_for(batch["category"], cfg.prompt.templates, system.clauses, system.tokens, rng)
            terms = training_losses(system, batch, prompts, generator, latent_cache=latent_cache)
            loss = sum(w * v.float().mean() for w, v in terms.values()) / tc.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.time() - started
    system.heads.eval()
    after = object_denoise_loss(system, all_views, prompts_all, latent_cache)

    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "objects" / records[0].name
    adapters = getattr(system, "adapters", None)
    return _write_artefact(system, out_dir, all_views, adapters,
                           {"run": str(run_dir), "object": str(object_dir), "mode": mode, "steps": steps,
                            "more_views": None if more_views is None else str(more_views), "views": len(views),
                            "batch_size": tc.batch_size, "grad_accum": tc.grad_accum, "seconds": round(seconds, 3),
                            "denoise_before": before, "denoise_after": after, "tune_losses": tc.losses})


def _check_counts(counts: dict) -> None:
    """Tuning steps, batch size and accumulation are whole numbers >= 1 (None: the run's own);
    0 steps would write an untuned artefact."""
    for key, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}: must be a whole number >= 1, got {value!r}")


def target_objects(run_dir: Path, cfg, objects_dir=None) -> list:
    """The objects targets are tuned on and heads fitted to: the run's training split, or every
    object in `objects_dir` (more objects than the run trained on), never one the run holds out."""
    root = resolve_data_root(cfg.data.root)
    training, held_out = run_split(scan_objects(root), cfg.data.holdout, root, run_dir)[:2]
    if objects_dir is None:
        return training
    records = scan_objects(objects_dir)
    kept_out = {r.root.resolve() for r in held_out}
    leaked = [r.name for r in records if r.root.resolve() in kept_out]
    if leaked:
        raise DataError(f"--objects {objects_dir}: holds the run's held-out object {leaked[0]}; targets must not see them")
    return records


def tune_targets(run_dir, out_path, steps: int | None = None, seed: int = 0, progress=print, more_views=None,
                 objects_dir=None) -> dict:
    """Tune every training object of the run (its data minus the held-out objects) from the run's
    heads and write their object-level words to `out_path` (keys <concept>/<object>).
    more_views: a folder holding, for every training object, <object name>/ with more views of it
    (tune_object's more_views; e.g. `python -m toyworld objects --as-other-categories`).
    objects_dir: tune every object there instead of the run's training split (target_objects)."""
    import tempfile
    _check_counts({"steps": steps})
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    training = target_objects(run_dir, cfg, objects_dir)
    names = [n for n in cfg.tokens if CONCEPTS[n].concept.object_level]
    if not names:
        raise ConfigError(f"{run_dir}: none of its words ({', '.join(cfg.tokens)}) is one word per object")
    if more_views is not None:
        missing = [r.name for r in training if not (Path(more_views) / r.name).is_dir()]
        if missing:
            raise DataError(f"--more-views {more_views}: no folder for {len(missing)} training objects, e.g. {missing[0]}")
    targets, started = {n: {} for n in names}, time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for i, record in enumerate(training):
            info = tune_object(run_dir, record.root, steps, Path(scratch) / record.name, "encoder", seed=seed,
                               more_views=None if more_views is None else Path(more_views) / record.name)
            for n in names:
                targets[n][record.name] = load_token(Path(info["path"]) / "tokens" / f"{n}.safetensors")[1]
            progress(f"{i + 1}/{len(training)} {record.name}: denoising {info['denoise_before']:.4f} -> {info['denoise_after']:.4f}")
    info = {"run": str(run_dir), "objects": len(training), "concepts": names, "steps": info["steps"],
            "more_views": None if more_views is None else str(more_views),
            "objects_dir": None if objects_dir is None else str(objects_dir),
            "seconds": round(time.time() - started, 1)}
    atomic_write(out_path, lambda tmp: save_word_targets(tmp, targets, info))
    return {**info, "path": str(out_path)}


def fit_heads_to_targets(run_dir, targets_path, out_dir, steps: int = 100, lr: float = 1e-3,
                         progress=print, objects_dir=None) -> dict:
    """Regress every object-level head of the run onto the target words of its training objects
    (`tune.py --targets`): 1 - cos(word, target), all of each object's masks, full heads (encoder and
    MLP), batch norm running statistics kept (generation uses them). Writes a copy of the run with
    the fitted heads in its latest checkpoint to `out_dir` (never over an existing folder).
    objects_dir: the objects the targets were tuned on, when not the run's (tune_targets')."""
    import shutil

    from guided_concepts.checkpointing import latest_checkpoint
    from guided_concepts.validation import first_views
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"--out {out_dir}: exists; the fitted run is written to a new folder")
    if steps < 1 or not lr > 0:
        raise ConfigError(f"--fit needs steps >= 1 and a positive lr, got {steps}, {lr}")
    system, cfg = generate.load_run(run_dir)
    names = [n for n in system.tokens if CONCEPTS[n].concept.object_level]
    shapes = {n: (system.heads[n].config.num_vectors, system.table.embedding_dim) for n in names}
    targets = load_word_targets(targets_path, names, shapes)
    records = [r for r in target_objects(run_dir, cfg, objects_dir) if all(r.name in targets[n] for n in names)]
    if not records:
        raise ConfigError(f"{targets_path}: no target words for this run's training objects")
    batch = first_views(ObjectViewsDataset(records, cfg.data.resolution, flip_prob=0.0, **mask_set_options(cfg)),
                        len(records))
    info = {"run": str(run_dir), "targets": str(targets_path), "objects": len(records), "steps": steps, "lr": lr,
            "objects_dir": None if objects_dir is None else str(objects_dir)}
    torch.manual_seed(0)
    for n in names:
        concept = system.heads[n]
        wanted = torch.stack([targets[n][name] for name in batch["object_name"]])          # [N, K, D]
        valid = torch.ones(len(wanted), dtype=torch.bool)
        optimizer = torch.optim.Adam([p for p in concept.parameters() if p.requires_grad], lr=lr)
        concept.train()
        for module in concept.modules():       # the objects' own statistics stay those of the run
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        for step in range(steps):
            loss = word_target_loss(concept.encode(batch).embeds, wanted, valid).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 0:
                info[f"{n}/loss_before"] = round(loss.item(), 5)
        info[f"{n}/loss_after"] = round(loss.item(), 5)
        progress(f"{n}: 1 - cos to the targets {info[f'{n}/loss_before']:.4f} -> {info[f'{n}/loss_after']:.4f}")
        concept.eval()

    def write(tmp: Path):
        # The run without what the old heads wrote (token files, per-object artefacts, exports).
        shutil.copytree(run_dir, tmp, dirs_exist_ok=True, ignore=lambda folder, names: [
            x for x in names if Path(folder) == run_dir and x in ("tokens", "objects", "export")])
        checkpoint = latest_checkpoint(tmp)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in system.trainable_state().items()},
                  str(checkpoint / "heads.safetensors"))
        (tmp / "fit_targets.json").write_text(json.dumps(info, indent=1))
    atomic_folder(out_dir, write)
    return {**info, "path": str(out_dir)}


def _write_artefact(system, out_dir: Path, views: dict, adapters, info: dict) -> dict:
    """<out>/{heads.safetensors, adapters.safetensors, tokens/<concept>.safetensors, lora/, artefact.json}."""
    def write(tmp: Path):
        save_file({k: v.detach().float().cpu().contiguous() for k, v in system.trainable_state().items()},
                  str(tmp / "heads.safetensors"))
        with torch.no_grad():
            first = {k: v[:1] for k, v in views.items()}           # the object's first view
            for concept, out in system.encode(first).items():
                save_word(tmp / "tokens" / f"{concept}.safetensors", system.heads[concept].config.token, out.embeds[0],
                          system.table.embedding_dims)
        if adapters is not None:
            save_file(adapters.state_dict(), str(tmp / "adapters.safetensors"))
            adapters.export_lora(tmp / "lora")
        info["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / "artefact.json").write_text(json.dumps(info, indent=1))
    atomic_folder(out_dir, write)
    return {**info, "path": str(out_dir)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the domain run (runs/<name>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--object", help="the new object's folder (views/, masks/, meta.json)")
    which.add_argument("--targets", metavar="FILE", help="tune every training object of the run; write their words "
                                                          "to FILE (safetensors) for train.word_targets")
    which.add_argument("--fit", metavar="FILE", help="regress the run's object-level heads onto FILE's words "
                                                      "(from --targets); write the fitted run to --out")
    p.add_argument("--steps", type=positive_int,
                   help="tuning steps (default: the run's tune.steps, 15; with --fit, 100)")
    p.add_argument("--mode", choices=["encoder", "textual_inversion"], default="encoder",
                   help="tune the run's heads (+adapters), or the textual-inversion baseline")
    p.add_argument("--batch-size", type=positive_int, help="views per step (tune.batch_size)")
    p.add_argument("--grad-accum", type=positive_int, help="gradient accumulation (tune.grad_accum)")
    p.add_argument("--out", help="artefact folder (default: <run>/objects/<object>); with --fit, the new run folder")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="--fit: the regression's learning rate")
    p.add_argument("--objects", metavar="DIR", help="--targets / --fit: every object folder in DIR instead of the "
                   "run's training objects (more objects than it trained on; never its held-out ones)")
    p.add_argument("--more-views", metavar="DIR", help="more views of the object (--object: a folder of object "
                   "folders; --targets: DIR/<object name>/ for each), e.g. its shape rendered as other categories "
                   "(python -m toyworld objects --as-other-categories); prompts name each folder's category")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("grad_accum", args.grad_accum)) if v is not None}
    try:
        if args.fit:
            if args.more_views:
                p.error("--more-views: --fit regresses onto the words in FILE; give it to --targets")
            if not args.out:
                p.error("--fit writes a new run folder: give --out")
            info = fit_heads_to_targets(args.run, args.fit, args.out, args.steps or 100, args.lr, objects_dir=args.objects)
        elif args.targets:
            if args.mode != "encoder" or args.out:
                p.error("--targets tunes the run's heads (--mode encoder) and writes only FILE (no --out)")
            info = tune_targets(args.run, args.targets, args.steps, more_views=args.more_views, objects_dir=args.objects)
        else:
            info = tune_object(args.run, args.object, args.steps, args.out, args.mode, overrides,
                               more_views=args.more_views)
    except (ConfigError, DataError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    entry_point(main)
