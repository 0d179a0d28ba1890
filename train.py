"""Train guided-concept words on a frozen Stable Diffusion model.

    python train.py --tokens shape                     # tiny model, bundled synthetic chairs
    accelerate launch train.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --set data.root=my_chairs \
        --set data.resolution=512 --set model.mixed_precision=fp16

The only file that knows accelerate. The CLI builds and validates a config; everything else is
the loop.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

from guided_concepts.backbone.load import check_vocabulary
from guided_concepts.checkpointing import (CheckpointError, RunFolderError, RunLock, StopSignals, append_environment, atomic_write,
                                           check_run_dir, check_run_name, check_writable, end_training_patiently, environment_record,
                                           global_rng_states, heads_fingerprint, latest_checkpoint,
                                           latest_intact_checkpoint, load_adapters, load_checkpoint, load_state, prepare_run_dir,
                                           prune_checkpoints, record_failure, remove_stale_temporaries,
                                           restore_global_rng_states, save_checkpoint, set_aside_newer,
                                           truncate_metrics)
from guided_concepts.configs.schema import (Config, ConfigError, check_overrides, check_resume, config_sources, config_to_dict,
                                           explain_config, load_config, save_config)
from guided_concepts.metrics import RunningMeans
from guided_concepts.progress import Progress
from guided_concepts.objectdata import DataError, ShuffledBatchSampler, TripletBatchSampler, collate, ignore_stop_signals
from guided_concepts.cli import describe_os_error, entry_point
from guided_concepts.rundata import (DATA_RECORD, build_data, data_changes, data_record, derived_settings,
                                     load_run_config, read_data_record, resolve_data_root, samples_per_step,
                                     with_derived)
from guided_concepts.system import build_system, load_backbone_for
from guided_concepts.tokens.placeholders import embedding_dims
from guided_concepts.tokens.targets import load_word_targets
from guided_concepts.validation import export_tokens, validate
from guided_concepts.prompts import make_prompts
from guided_concepts.objective import training_losses
from guided_concepts.backbone.latents import LatentCache

CONFIG_ENV_VAR = "GUIDED_CONCEPTS_CONFIG"   # a default config of your own (the tests point it at configs/tiny.yaml)


# ----------------------------------------------------------------------------------------------
# CLI -> config
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.environ.get(CONFIG_ENV_VAR, str(Path(__file__).parent / "configs" / "base.yaml")),
                   help=f"YAML config (default: ${CONFIG_ENV_VAR}, else configs/base.yaml)")
    p.add_argument("--tokens", help="active concepts, e.g. shape or shape,pose")
    p.add_argument("--model", help="'tiny', a diffusers Stable Diffusion folder, or a hub id (model.name)")
    p.add_argument("--name", help="run folder name (run.name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set losses.shape.mask_weight=0.2 (repeatable)")
    p.add_argument("--report-to", choices=["none", "wandb"], help="also log to wandb (run.report_to)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--force", action="store_true", help="with --resume: accept a config that differs from the run's, "
                   "or a data folder that changed (the recorded held-out objects stay held out)")
    p.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms (train.deterministic)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward "
                   "(model.gradient_checkpointing)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (model.compile)")
    p.add_argument("--help-config", action="store_true", help="print the resolved config (every key, its value, "
                   "where the value came from: default, YAML or --set, and its help), then exit: a dry run")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("model", "model.name"), ("name", "run.name"), ("report_to", "run.report_to")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    for flag, key in (("deterministic", "train.deterministic"), ("gradient_checkpointing", "model.gradient_checkpointing"),
                      ("compile", "model.compile")):
        if getattr(args, flag):
            overrides.append(f"{key}=true")
    check_overrides(overrides)       # a key given twice would silently keep the last value
    config_path = args.config
    given_config = any(a == "--config" or a.startswith("--config=") for a in (argv or sys.argv[1:]))
    if args.resume and not given_config:   # a resumed run keeps its own config; --set can change e.g. train.steps
        base = load_config(args.config, overrides)
        run_dir = Path(base.run.output_dir).expanduser() / check_run_name(base.run.name)
        config_path = run_dir / "config.yaml"
        if run_dir.is_dir() and not config_path.is_file():
            raise CheckpointError(f"{run_dir}: --resume given but the run has no config.yaml (it was stopped before "
                                  "writing it, so there is nothing to continue); start it again with --overwrite")
    cfg = load_config(config_path, overrides, tokens=args.tokens)
    try:                                 # the vocabulary step of adding a concept, before any model loads
        check_vocabulary(cfg.model.name, {f"concepts.{n}.initializer": cfg.concepts[n].initializer for n in cfg.tokens})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.help_config:
        args.explained = explain_config(cfg, config_sources(config_path, overrides, args.tokens))
    return cfg, args


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--sweep" or a.startswith("--sweep=") for a in argv):
        sys.exit("error: --sweep has its own entry point: python sweep.py --sweep KEY=V1,V2,... (the same arguments)")
    try:
        cfg, args = parse_args(argv)
        if args.help_config:          # nothing is loaded or written
            print(args.explained)
            return None
        run_dir = Path(cfg.run.output_dir).expanduser() / check_run_name(cfg.run.name)
        recorded = read_data_record(run_dir) if args.resume else None
        # A resumed run keeps the held-out objects it was split on.
        train_set, val_set = build_data(cfg, recorded["held_out"] if recorded else None)
        data_root = resolve_data_root(cfg.data.root)
        args.data = {**data_record(train_set, val_set, data_root), "samples_per_step": samples_per_step(cfg, train_set),
                     # a resumed run keeps the bounds its heads were trained with, even on changed data
                     "derived": recorded["derived"] if recorded and "derived" in recorded
                                else derived_settings(cfg, train_set, val_set)}
        args.given_config = cfg       # config.yaml keeps what was set; the run trains on its data-fitted copy
        cfg = with_derived(cfg, args.data["derived"])
        run_dir = check_run_dir(run_dir, args.resume, args.overwrite, data_root)
        check_writable(run_dir)       # before the model loads (minutes on real weights)
        if args.resume:
            # A checkpoint damaged after it was written (a full disk, a bad copy) is skipped for the
            # newest one that loads whole; run() sets the damaged ones aside.
            args.resume_from, args.damaged = latest_intact_checkpoint(run_dir)
            if args.resume_from is None:
                raise CheckpointError(f"no intact checkpoint to resume from in {run_dir / 'checkpoints'}: "
                                      + "; ".join(args.damaged))
            check_resume(cfg, run_dir, args.force, args.resume_from, trained_config=load_run_config(run_dir))
            check_resume_point(cfg, args.resume_from)
            args.data_note = check_resume_data(recorded, args.data, run_dir, args.force, cfg.data.holdout)
    except (ConfigError, DataError, FileExistsError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:             # a data root, cache or home that cannot be read or written
        sys.exit(f"error: {describe_os_error(err)}")
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        return run(cfg, args, train_set, val_set, run_dir)
    except RunFolderError as err:         # another process took the folder meanwhile
        sys.exit(f"error: {err}")
    except (OSError, DataError) as err:   # a full disk, a data file changed or gone while the run trained
        last = latest_intact_checkpoint(run_dir)[0] if run_dir.is_dir() else None
        what = describe_os_error(err) if isinstance(err, OSError) else f"{err} (changed while the run trained)"
        sys.exit(f"error: {what}; the last intact checkpoint is {last or 'none yet'}"
                 + ("; continue with --resume" if last else ""))
    finally:
        if getattr(args, "lock", None):
            args.lock.release()
        # Whatever ended the run (done, stopped, an exception): give back the process-wide state
        # so main() can run again in this process (sweeps, tests) with other settings.
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1:]
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def check_resume_data(recorded: dict | None, current: dict, run_dir: Path, force: bool, holdout: int) -> str | None:
    """A resumed run trains on the data it was split on: a changed data folder is refused, or with
    --force resumed on the new data with the recorded held-out objects still held out. -> a note."""
    if recorded is None:
        return f"note: {run_dir} has no {DATA_RECORD} (a run from an older version): its data is recorded from now on"
    if holdout != len(recorded["held_out"]) and len(recorded["held_out"]) > 0:
        raise ConfigError(f"data.holdout={holdout}: the run holds out {len(recorded['held_out'])} recorded object(s) "
                          f"({run_dir / DATA_RECORD}); a resumed run keeps its split, even with --force: start a "
                          "new run (--name) for another one")
    changes = data_changes(recorded, current)
    if not changes:
        return None
    said = "; ".join(changes)
    if not force:
        raise DataError(f"{run_dir / DATA_RECORD}: the data changed since the run was split ({said}); restore it, "
                        "or pass --force to go on with the new objects in training and the recorded held-out "
                        "objects still held out")
    return (f"warning: --force: resuming on changed data ({said}); held out as recorded: "
            f"{', '.join(current['held_out']) or 'none'}; {DATA_RECORD} records the new data")


def check_resume_point(cfg: Config, checkpoint: Path) -> None:
    step = load_state(checkpoint)["step"]
    if step > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step of {checkpoint} ({step}); the run is "
                          f"already past it: --set train.steps=N with N >= {step} to continue it")


# ----------------------------------------------------------------------------------------------
# Setup: the accelerator, the model, the run folder
# ----------------------------------------------------------------------------------------------
def make_accelerator(cfg: Config) -> Accelerator:
    # Several processes and no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a
    # laptop): gloo on CPU. Without cpu=True accelerate would let each process train alone.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world > 1 and not torch.cuda.is_available(),
                              mixed_precision=cfg.model.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=None if cfg.run.report_to == "none" else cfg.run.report_to,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.num_processes != world:
        sys.exit(f"error: launched as {world} processes but accelerate runs {accelerator.num_processes}; "
                 "each would train alone (check the launcher's backend)")
    return accelerator


def build_model(cfg: Config):
    """-> (backbone, system, adapters or None). Raises ValueError/OSError for a model that does not
    fit the config, before anything is written (minutes on real weights)."""
    backbone = load_backbone_for(cfg)
    set_seed(cfg.train.seed)     # after loading: building a missing tiny model draws from the RNG too
    pulled = [n for n in cfg.tokens if cfg.losses[n].target_weight > 0]
    targets = None
    if pulled:
        if not cfg.train.word_targets:
            raise ValueError(f"losses.{pulled[0]}.target_weight > 0 needs train.word_targets "
                             "(write one with tune.py --run <domain run> --targets <file>)")
        width = sum(embedding_dims(backbone.text_side))      # SDXL: both encoders' parts
        targets = load_word_targets(cfg.train.word_targets, pulled, {n: (cfg.concepts[n].num_vectors, width) for n in pulled})
    system = build_system(cfg, backbone, word_targets=targets)
    adapters = system.adapters
    if cfg.data.resolution % backbone.vae_scale_factor:
        r, f = cfg.data.resolution, backbone.vae_scale_factor
        raise ValueError(f"data.resolution: {r} is not divisible by the VAE's downsampling factor {f} of "
                         f"{cfg.model.name}; use {r // f * f or f} or {(r // f + 1) * f}")
    return backbone, system, adapters


def load_resume_point(ckpt: Path, cfg: Config, system, adapters) -> SimpleNamespace:
    """The checkpoint loads into these heads before anything is written; -> step, heads (tensor
    count), optimizer state and state.json. Raises ValueError when it belongs to another config."""
    step, head_state, opt_state, state = load_checkpoint(ckpt)
    system.load_trainable_state(head_state, f"{ckpt}, model {state.get('model')!r}; this config's model is {cfg.model.name!r}")
    saved_groups = len(opt_state["optimizer"]["param_groups"])
    if adapters is not None and load_adapters(ckpt) is None:
        raise ValueError(f"{ckpt}: has no adapters.safetensors but the config has adapters.kind="
                         f"{cfg.adapters.kind}; resume with the run's own adapters setting")
    if saved_groups not in (len(cfg.tokens), len(cfg.tokens) + (adapters is not None)):
        raise ValueError(f"{ckpt}: its optimizer has {saved_groups} parameter groups, this config "
                         f"{len(cfg.tokens)} (+1 with adapters); resume with the run's own config")
    return SimpleNamespace(path=ckpt, step=step, head_tensors=len(head_state), opt_state=opt_state, state=state)


def prepare_folder(accelerator, cfg: Config, args, run_dir: Path, backbone) -> None:
    """Rank 0 writes the folder, config.yaml and the environment record; every rank waits for it."""
    accelerator.wait_for_everyone()          # every rank has checked the folder before rank 0 touches it
    if accelerator.is_main_process:
        args.lock = RunLock(run_dir).acquire()          # one process trains in a folder at a time
        if args.lock.stale:
            accelerator.print(f"note: {args.lock.file} was left by a process that is gone ({args.lock.stale}); taken over")
        prepare_run_dir(run_dir, args.resume, args.overwrite, resolve_data_root(cfg.data.root))
        if getattr(args, "data_note", None):
            accelerator.print(args.data_note)
        atomic_write(run_dir / DATA_RECORD, lambda tmp: tmp.write_text(json.dumps(args.data, indent=1)))
        if args.resume and args.damaged:
            aside = set_aside_newer(run_dir, args.resume_from)
            accelerator.print(f"warning: {'; '.join(args.damaged)}; resuming from {args.resume_from.name} "
                              f"(set aside: {', '.join(aside)})")
        stale = remove_stale_temporaries(run_dir / "checkpoints") + remove_stale_temporaries(run_dir)
        if stale:
            accelerator.print(f"removed {len(stale)} half-written file(s) a killed run left: {', '.join(p.name for p in stale)}")
        save_config(args.given_config, run_dir / "config.yaml")
        if args.data["samples_per_step"] != cfg.train.batch_size:
            why = "whole triplets, data.triplets" if cfg.data.triplets else "the training views"
            accelerator.print(f"note: train.batch_size {cfg.train.batch_size} gives {args.data['samples_per_step']} samples a "
                              f"step ({why}); data.json records samples_per_step")
        append_environment(run_dir, environment_record(
            seed=cfg.train.seed, resumed=args.resume, device=str(accelerator.device), num_processes=accelerator.num_processes,
            mixed_precision=accelerator.mixed_precision, deterministic=cfg.train.deterministic,
            gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            scheduler={"class": type(backbone.scheduler).__name__, **dict(backbone.scheduler.config)}))
    accelerator.wait_for_everyone()


def place_model(accelerator, cfg: Config, backbone, system) -> None:
    """Frozen backbone on the device in the mixed-precision dtype; heads stay fp32."""
    if cfg.train.deterministic:   # warn_only: a few CUDA backward ops (bilinear resize) have no deterministic kernel
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    for module in backbone.frozen_modules():
        module.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:
        backbone.cast_frozen(weight_dtype)
    system.heads.to(accelerator.device)
    if cfg.model.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
    if cfg.model.compile:
        backbone.unet.compile()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def make_loader(cfg: Config, train_set, accelerator):
    """-> (sampler, loader). Workers are forked afresh each epoch: the dataset's epoch, which sets
    flips and mask sets, must reach them, so they are not persistent."""
    sampler = (TripletBatchSampler(train_set, max(1, cfg.train.batch_size // 3), seed=cfg.train.seed)
               if cfg.data.triplets else ShuffledBatchSampler(len(train_set), cfg.train.batch_size, seed=cfg.train.seed))
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals if workers else None,
                                         pin_memory=accelerator.device.type == "cuda")
    return sampler, loader


# ----------------------------------------------------------------------------------------------
# Optimizer: one parameter group per concept, each with its own lr (scaled by the schedule each
# step); the adapters join as one more group in phase 2
# ----------------------------------------------------------------------------------------------
def make_optimizer(cfg: Config, system) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in system.heads[n].parameters() if p.requires_grad],
               "lr": cfg.concepts[n].lr, "base_lr": cfg.concepts[n].lr, "name": n} for n in cfg.tokens]
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def set_base_lrs(optimizer, cfg: Config) -> None:
    """Each group's lr before the schedule: the config's (the heads' scaled down in phase 2)."""
    in_phase2 = len(optimizer.param_groups) > len(cfg.tokens)
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.adapters.lr if group["name"] == "adapters" else \
            cfg.concepts[group["name"]].lr * (cfg.adapters.head_lr_scale if in_phase2 else 1.0)


def start_phase2(optimizer, adapters, cfg: Config) -> None:
    """Adapters join the same optimizer as a new group: the heads keep their Adam state."""
    adapters.set_trainable(True)
    optimizer.add_param_group({"params": adapters.parameters(), "lr": cfg.adapters.lr, "name": "adapters"})
    set_base_lrs(optimizer, cfg)


# ----------------------------------------------------------------------------------------------
# Loop state, resume and checkpoints
# ----------------------------------------------------------------------------------------------
def new_loop_state(cfg: Config, process_index: int) -> SimpleNamespace:
    """Position (step, epoch, batch to skip to), running means, and the run's own random streams:
    noise, timesteps and VAE sampling draw from `noise` (one stream per process), prompt templates
    and word subsets from `prompts`, so a resumed run continues them whatever else touched the
    global RNG."""
    return SimpleNamespace(step=0, epoch=0, skip=0, means=RunningMeans(),
                           noise=torch.Generator().manual_seed(cfg.train.seed * 1000 + process_index),
                           prompts=random.Random(cfg.train.seed + 7919 * process_index),
                           latent_cache=LatentCache() if cfg.data.cache_latents else None)


def restore(loop, resumed, accelerator, cfg: Config, run_dir: Path, optimizer, adapters) -> None:
    """Heads (already loaded), optimizer (and fp16 scaler), every RNG, the position in the epoch
    and the running means: the resumed run continues exactly where the saved one stood."""
    opt_state, state = resumed.opt_state, resumed.state
    if adapters is not None:
        adapters.load_state_dict(load_adapters(resumed.path))
        if len(opt_state["optimizer"]["param_groups"]) > len(cfg.tokens):    # saved in phase 2
            start_phase2(optimizer, adapters, cfg)
    optimizer.load_state_dict(opt_state["optimizer"])
    set_base_lrs(optimizer, cfg)
    if accelerator.scaler is not None and opt_state.get("scaler"):
        accelerator.scaler.load_state_dict(opt_state["scaler"])
    # Per process: its own noise stream, RNGs and running log sums (one list entry per rank).
    ranks = opt_state["rng"] if isinstance(opt_state["rng"], list) else [opt_state["rng"]]
    mine = ranks[accelerator.process_index] if len(ranks) == accelerator.num_processes else ranks[0]
    if len(ranks) != accelerator.num_processes:
        accelerator.print(f"warning: the checkpoint has {len(ranks)} process streams, this run {accelerator.num_processes}: "
                          "not an exact continuation")
    loop.noise.set_state(mine["noise"])
    loop.prompts.setstate(mine["prompts"])
    restored = restore_global_rng_states(mine["global"]) if "global" in mine else []
    loop.means = RunningMeans(mine.get("running", state.get("running", {})),
                              mine.get("running_count", state.get("running_count", 0)))
    loop.step, loop.epoch, loop.skip = resumed.step, state.get("epoch", 0), state.get("batch_in_epoch", 0)
    if accelerator.is_main_process:
        truncate_metrics(run_dir / "metrics.jsonl", loop.step)
    accelerator.print(f"resumed {run_dir} from {resumed.path.name}: step {loop.step} of {cfg.train.steps}, epoch "
                      f"{loop.epoch} batch {loop.skip}; restored heads ({resumed.head_tensors} tensors), optimizer "
                      f"({len(optimizer.param_groups)} groups), lr schedule ({cfg.train.lr_schedule}, "
                      f"x{cfg.train.lr_factor(loop.step):.3g}), RNGs (noise, prompts, {', '.join(restored)}), "
                      f"data order, config {run_dir / 'config.yaml'}")


def checkpoint(loop, accelerator, cfg: Config, run_dir: Path, system, optimizer, adapters, phase2: int,
               epoch: int, batch_in_epoch: int) -> None:
    # Every rank's heads must be the same (DDP); a fingerprint per rank in state.json shows it.
    mine = heads_fingerprint(system.trainable_state()).to(accelerator.device)
    ranks = accelerator.gather(mine[None]).cpu().tolist() if accelerator.num_processes > 1 else [mine.tolist()]
    if len({tuple(r) for r in ranks}) > 1:
        accelerator.print(f"warning: step {loop.step}: the processes' heads differ (fingerprints {ranks})")
    streams = {"noise": loop.noise.get_state(), "prompts": loop.prompts.getstate(), "global": global_rng_states(),
               "running": loop.means.sums, "running_count": loop.means.count}
    streams = gather_object([streams]) if accelerator.num_processes > 1 else [streams]    # one per rank
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_checkpoint(run_dir, loop.step, system.trainable_state(),
                        {"optimizer": optimizer.state_dict(), "scaler": scaler, "rng": streams},
                        {"tokens": cfg.tokens, "model": cfg.model.name, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                         "phase2": phase2, "rank_fingerprints": ranks},
                        adapters.state_dict() if adapters is not None else None)
        prune_checkpoints(run_dir, cfg.train.keep_last)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
def sync_stop_flags(accelerator, loss: torch.Tensor, signals: StopSignals) -> tuple[bool, bool]:
    """(a non-finite loss, a stop signal) on any process: every rank learns of either before
    backward, so all ranks stop, or checkpoint, together."""
    flags = torch.tensor([float(not torch.isfinite(loss)), float(bool(signals.received))], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def step_losses(system, heads, batch: dict, cfg: Config, loop, adapters, in_phase2: bool):
    """-> (prompts, terms: name -> (weight, per-sample values [B])) for one batch."""
    prompts, present = make_prompts(batch["category"], cfg.prompt.templates, system.clauses, loop.prompts,
                                    cfg.train.union_sampling, cfg.prompt.by_category)
    encoded = heads(batch)                                   # through DDP on several GPUs
    terms = training_losses(system, batch, prompts, loop.noise, present=present, encoded=encoded,
                            latent_cache=loop.latent_cache)
    if adapters is not None and cfg.adapters.kind == "e4t" and in_phase2:
        terms["adapters/l2"] = (cfg.adapters.l2_weight, adapters.penalty().expand(len(prompts)))
    return prompts, terms


def apply_gradients(accelerator, optimizer, adapters, cfg: Config) -> None:
    if accelerator.sync_gradients:
        if adapters is not None and accelerator.num_processes > 1:   # the UNet is not DDP-wrapped
            for p in adapters.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(cfg: Config, args, train_set, val_set, run_dir: Path) -> Path:
    """Train one validated config into `run_dir`: everything from here on may write."""
    # -- setup and model: a model or checkpoint that does not fit the config writes nothing
    accelerator = make_accelerator(cfg)
    try:
        backbone, system, adapters = build_model(cfg)
        resumed = load_resume_point(args.resume_from, cfg, system, adapters) if args.resume else None
    except (ValueError, OSError, TypeError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    # Phase 1: heads only; phase 2 (from adapters.start_step) adds the adapters with their own lr.
    phase2 = cfg.adapters.start_step if cfg.adapters.start_step >= 0 else cfg.train.steps // 2
    phase2 = resumed.state.get("phase2", phase2) if resumed else phase2   # where the run started them stays put
    prepare_folder(accelerator, cfg, args, run_dir, backbone)
    place_model(accelerator, cfg, backbone, system)
    # -- data and optimizer
    sampler, loader = make_loader(cfg, train_set, accelerator)
    optimizer = make_optimizer(cfg, system)
    heads, optimizer, loader = accelerator.prepare(system.heads, optimizer, loader)
    # -- resume
    loop = new_loop_state(cfg, accelerator.process_index)
    system.heads.set_noise_generator(loop.noise)
    if resumed:
        restore(loop, resumed, accelerator, cfg, run_dir, optimizer, adapters)
    if accelerator.is_main_process and cfg.run.report_to != "none":
        accelerator.init_trackers("guided-concepts", config=config_to_dict(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run.name, "dir": str(run_dir)}})

    def log(record: dict):
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.run.report_to != "none":
                accelerator.log(record, step=record["step"])

    def finish():
        accelerator.wait_for_everyone()      # no process tears the group down while another still uses it
        progress.close()
        end_training_patiently(accelerator)

    # -- loop
    # A bar on a terminal; plain lines in a log file or CI (progress.py).
    progress = Progress(cfg.train.steps, loop.step, "train", enabled=accelerator.is_local_main_process)
    started, waited, ready = time.time(), 0.0, time.perf_counter()
    heads.train()
    stop = 0                  # the stop signal, once every process has agreed on it (0: none)
    # A second Ctrl-C stops at once when alone; with several processes the launcher handles it.
    with StopSignals(escalate=accelerator.num_processes == 1) as signals:
        while loop.step < cfg.train.steps and not stop:
            # accelerate's loader re-sets the sampler's epoch from its own counter when iterated (and
            # a skip-loader on resume copies that counter): keep the counter on our epoch.
            for epoch_aware in (loader, train_set, sampler):
                epoch_aware.set_epoch(loop.epoch)
            batch_in_epoch = loop.skip
            for batch in accelerator.skip_first_batches(loader, loop.skip) if loop.skip else loader:
                waited += time.perf_counter() - ready          # the step waited this long for data
                batch_in_epoch += 1
                if adapters is not None and loop.step >= phase2 and not adapters.parameters()[0].requires_grad:
                    start_phase2(optimizer, adapters, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * cfg.train.lr_factor(loop.step)
                with accelerator.accumulate(heads), accelerator.autocast():
                    prompts, terms = step_losses(system, heads, batch, cfg, loop, adapters, loop.step >= phase2)
                    loss = sum(w * v.float().mean() for w, v in terms.values())      # the loop reduces
                    nonfinite, signalled = sync_stop_flags(accelerator, loss, signals)
                    if nonfinite:   # nothing is stepped or saved: the last checkpoint stays the last good one
                        message, record = record_failure(run_dir, loop.step + 1, terms, loss, batch, prompts,
                                                         accelerator.process_index)
                        if record:
                            log(record)
                        finish()
                        sys.exit(f"error: {message}")
                    if signalled and not stop:
                        stop = signals.received or signal.SIGTERM
                        accelerator.print(f"\n{signal.Signals(stop).name}: finishing this step, then checkpointing")
                    accelerator.backward(loss)
                    apply_gradients(accelerator, optimizer, adapters, cfg)
                loop.means.add(terms, loss)
                ready = time.perf_counter()
                if not accelerator.sync_gradients:
                    continue
                loop.step += 1
                progress.update(loop.step, loss.item(), optimizer.param_groups[0]["lr"])
                if loop.step % cfg.train.log_every == 0 or loop.step == cfg.train.steps:
                    elapsed = time.time() - started
                    log({"step": loop.step, **loop.means.means(gather_object if accelerator.num_processes > 1 else None),
                         **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},      # unweighted means
                         "time": round(elapsed, 2), "time/data_wait_frac": round(waited / max(elapsed, 1e-9), 4)})
                    loop.means.reset()
                done_epoch = batch_in_epoch >= len(loader)
                if loop.step % cfg.train.checkpoint_every == 0 or loop.step == cfg.train.steps or stop:
                    checkpoint(loop, accelerator, cfg, run_dir, system, optimizer, adapters, phase2,
                               loop.epoch + done_epoch, 0 if done_epoch else batch_in_epoch)
                if stop and loop.step < cfg.train.steps:      # on the last step: finish as usual instead
                    break
                every = cfg.train.sample_every
                sample_now = every > 0 and loop.step % every == 0 or (every >= 0 and loop.step == cfg.train.steps)
                if accelerator.is_main_process and sample_now:
                    heads.eval()
                    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=cuda):    # validation leaves the training RNGs alone
                        log({"step": loop.step, **validate(system, cfg, val_set, loop.step, run_dir, accelerator.device)})
                    heads.train()
                if loop.step >= cfg.train.steps:
                    break
                ready = time.perf_counter()
            else:
                loop.epoch, loop.skip = loop.epoch + 1, 0
    # -- finish
    if stop and loop.step < cfg.train.steps:
        accelerator.print(f"stopped by {signal.Signals(stop).name} at step {loop.step}: checkpoint "
                          f"{latest_checkpoint(run_dir)} written; continue with --resume")
        finish()
        sys.exit(128 + stop)
    if accelerator.is_main_process:
        export_tokens(system, [d for d in (train_set, val_set) if d.on_disk], run_dir, accelerator.device)
        accelerator.print(f"done: {run_dir} (checkpoints/, samples/, tokens/, metrics.jsonl)")
    finish()
    return run_dir


if __name__ == "__main__":
    entry_point(main)
