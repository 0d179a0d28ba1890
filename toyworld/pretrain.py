"""Pretrain ToyWorld: a small Stable Diffusion (VAE, CLIP text model, UNet) on rendered chairs.

    python -m toyworld pretrain --out runs/toyworld            # ~50 min on 2 CPU cores
    python -m toyworld pretrain --out runs/toyworld2 --world toyworld2
    python -m toyworld pretrain --out runs/toyworld --resume   # continue after an interruption

Stages, each resumable, run in order:
    data     render training chairs (HELD_OUT_COMBOS never appear) and scorer chairs (all combos)
    vae      train the VAE on the training renders; set its scaling factor from the latents' std
    unet     train the text encoder and UNet together on cached latents and generated captions
             (captions drop phrases at random, 10% are empty for classifier-free guidance), EMA
    scorer   train the ground-truth scorer CNN (toyworld.scorer) on the scorer renders
    export   write model/: a StableDiffusionPipeline folder in fp16 (EMA weights) + scorer/
    evaluate score the exported model on prompts held out from pretraining -> model/metrics.json

Every random draw is a function of (seed, stage, step), so a resumed run equals one never stopped.
Checkpoints (one per training stage, replaced atomically) hold model, EMA and optimizer state.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from guided_concepts.checkpointing import atomic_folder, atomic_write, remove_stale_temporaries
from guided_concepts.configs.schema import apply_override, build_dataclass, parse_override
from guided_concepts.toyworld import models
from guided_concepts.toyworld.models import ToyWorldSizes
from guided_concepts.toyworld.worlds import WORLDS

STAGES = ("data", "vae", "unet", "scorer", "export", "evaluate")


@dataclass
class PretrainConfig:
    world: str = field(default="toyworld", metadata={"help": "toyworld (chairs) or toyworld2 (four categories, one shape space)"})
    seed: int = field(default=0, metadata={"help": "every draw derives from (seed, stage, step)"})
    chairs: int = field(default=3000, metadata={"help": "training objects (each a new geometry)"})
    views: int = field(default=8, metadata={"help": "random cameras per training chair"})
    scorer_chairs: int = field(default=1200, metadata={"help": "objects rendered to train the scorer (all combinations)"})
    vae_steps: int = field(default=800, metadata={"help": "VAE optimizer steps"})
    vae_batch: int = field(default=32, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak lr (cosine decay)"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "KL weight, as in SD's VAE"})
    unet_steps: int = field(default=4500, metadata={"help": "UNet + text encoder optimizer steps"})
    unet_batch: int = field(default=64, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=4e-4, metadata={"help": "UNet and text encoder peak lr (warmup, cosine decay)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear lr warmup of the UNet stage"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay (with warmup) of UNet and text encoder"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting (0 = plain MSE)"})
    foreground_weight: float = field(default=1.0, metadata={"help": "UNet loss weight on the object's pixels, against 1 on the background (small parts such as arms)"})
    balance_combinations: bool = field(default=False, metadata={"help": "UNet stage: draw training images so every attribute combination the world names (toyworld2: category x coarse shape words) is equally likely; rare ones (arms) are drawn more"})
    caption_keep: float = field(default=0.8, metadata={"help": "probability each attribute phrase is in the caption"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability the caption is empty (classifier-free guidance)"})
    scorer_steps: int = field(default=1500, metadata={"help": "scorer optimizer steps"})
    checkpoint_every: int = field(default=250, metadata={"help": "steps between checkpoints of a training stage"})
    eval_seeds: int = field(default=2, metadata={"help": "samples per (prompt, direction) in evaluation"})
    eval_steps: int = field(default=20, metadata={"help": "DDIM steps in evaluation"})
    guidance_scale: float = field(default=4.0, metadata={"help": "classifier-free guidance in evaluation"})
    sizes: ToyWorldSizes = field(default_factory=ToyWorldSizes)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(seed, stage, step).integers(2**62)))


class Pretraining:
    def __init__(self, out: Path, config: PretrainConfig, log=print):
        self.out, self.config, self.log = Path(out), config, log
        self.sizes = config.sizes
        self.world = WORLDS[config.world]

    # -- bookkeeping --------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return (self.out / "stages" / stage / "done.json").exists()

    def finish(self, stage: str, write, summary: dict) -> None:
        """The stage's outputs go into stages/<stage>/ in one atomic rename, with done.json."""
        def write_all(tmp: Path):
            write(tmp)
            (tmp / "done.json").write_text(json.dumps(summary, indent=1))
        atomic_folder(self.out / "stages" / stage, write_all)
        self.log(f"[{stage}] done: {json.dumps(summary)}")

    def stage_dir(self, stage: str) -> Path:
        return self.out / "stages" / stage

    def run(self, stop_after: str | None = None) -> Path:
        remove_stale_temporaries(self.out / "stages")
        remove_stale_temporaries(self.out / "checkpoints")
        for stage in STAGES:
            if not self.done(stage):
                started = time.time()
                getattr(self, f"stage_{stage}")()
                timing = self.out / "timings.json"
                times = json.loads(timing.read_text()) if timing.exists() else {}
                times[stage] = times.get(stage, 0) + round(time.time() - started, 1)
                atomic_write(timing, lambda p: p.write_text(json.dumps(times, indent=1)))
            if stage == stop_after:
                break
        return self.out / "model"

    def save_training(self, stage: str, step: int, modules: dict, optimizer, ema=None) -> None:
        def write(tmp: Path):
            for name, module in modules.items():
                save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step}))
        atomic_folder(self.out / "checkpoints" / stage, write)

    def load_training(self, stage: str, modules: dict, optimizer, ema=None) -> int:
        folder = self.out / "checkpoints" / stage
        if not (folder / "state.json").exists():
            return 0
        for name, module in modules.items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        state = torch.load(folder / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = json.loads((folder / "state.json").read_text())["step"]
        self.log(f"[{stage}] resumed at step {step}")
        return step

    # -- stages -------------------------------------------------------------------------------------
    def stage_data(self):
        c = self.config
        bar = tqdm(total=c.chairs + c.scorer_chairs, desc="render", unit="object")
        train, scorer_set = self.world.data(c, self.sizes.resolution, bar.update)
        bar.close()
        self.finish("data", lambda tmp: (np.savez_compressed(tmp / "train.npz", **train),
                                         np.savez_compressed(tmp / "scorer.npz", **scorer_set)),
                    {"train_images": len(train["images"]), "scorer_images": len(scorer_set["images"])})

    def load_data(self, name: str) -> dict:
        with np.load(self.stage_dir("data") / f"{name}.npz") as data:
            return {k: data[k] for k in data.files}

    def stage_vae(self):
        c = self.config
        torch.manual_seed(c.seed)
        vae = models.build_vae(self.sizes)
        data = self.load_data("train")
        images = pixels(data["images"])                                       # [N,3,H,W] in [-1,1]
        masks = torch.from_numpy(data["masks"]).float()[:, None]              # [N,1,H,W]
        optimizer = torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, weight_decay=0.0)
        start = self.load_training("vae", {"vae": vae}, optimizer)
        bar = tqdm(range(start, c.vae_steps), initial=start, total=c.vae_steps, desc="vae")
        for step in bar:
            rng = step_rng(c.seed, "vae", step)
            index = torch.from_numpy(rng.choice(len(images), c.vae_batch, replace=False))
            x, weight = images[index], 1 + 4 * masks[index]   # chair pixels weigh more than the white floor
            for group in optimizer.param_groups:
                group["lr"] = c.vae_lr * cosine_lr(step, c.vae_steps, 20)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=step_generator(c.seed, "vae", step))
            recon = vae.decode(z).sample
            error = recon - x
            loss = (weight * (error.abs() + error.pow(2))).mean() + c.vae_kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % c.checkpoint_every == 0 and step + 1 < c.vae_steps:
                self.save_training("vae", step + 1, {"vae": vae}, optimizer)
        vae.eval()
        with torch.no_grad():
            means, stds = encode_all(vae, images)
            scaling = 1.0 / float(means.std())
            recon = torch.cat([vae.decode(m[None]).sample for m in means[:256]])
            psnr = float(-10 * torch.log10(((recon.clamp(-1, 1) - images[:256]) / 2).pow(2).mean()))
        vae.register_to_config(scaling_factor=scaling)

        def write(tmp: Path):
            vae.save_pretrained(tmp / "vae")
            save_file({"mean": means.contiguous(), "std": stds.contiguous()}, str(tmp / "latents.safetensors"))
        self.finish("vae", write, {"scaling_factor": scaling, "psnr_db_first_256": round(psnr, 2)})

    def stage_unet(self):
        from diffusers.training_utils import EMAModel
        c = self.config
        torch.manual_seed(c.seed + 1)
        tokenizer = models.build_tokenizer(self.sizes, self.world.caption_words())
        text_encoder = models.build_text_encoder(self.sizes, len(tokenizer))
        unet = models.build_unet(self.sizes)
        scheduler = models.build_scheduler()
        from diffusers import AutoencoderKL
        scaling = AutoencoderKL.load_config(self.stage_dir("vae") / "vae")["scaling_factor"]
        latents = load_file(str(self.stage_dir("vae") / "latents.safetensors"))
        data = self.load_data("train")
        count = len(data["images"])
        masks = torch.from_numpy(data["masks"])   # [N,H,W] bool: the foreground loss weight
        del data["images"], data["masks"]         # captions need the labels only
        draw = combination_balanced(self.world.combination(data)) if c.balance_combinations else None   # [N] or None
        params = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=c.unet_lr, weight_decay=1e-2)
        ema = EMAModel(params, decay=c.ema_decay, use_ema_warmup=True)
        modules = {"unet": unet, "text_encoder": text_encoder}
        start = self.load_training("unet", modules, optimizer, ema)
        alphas = scheduler.alphas_cumprod
        bar = tqdm(range(start, c.unet_steps), initial=start, total=c.unet_steps, desc="unet")
        for step in bar:
            rng, gen = step_rng(c.seed, "unet", step), step_generator(c.seed, "unet", step)
            index = rng.choice(count, c.unet_batch, replace=False, p=draw)
            captions = ["" if rng.random() < c.caption_dropout else
                        self.world.caption(rng, data, i, c.caption_keep) for i in index]
            index = torch.from_numpy(index)
            mean, std = latents["mean"][index], latents["std"][index]
            z = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling       # [B,4,h,w]
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=gen)
            noisy = scheduler.add_noise(z, noise, t)
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids                            # [B,T]
            for group in optimizer.param_groups:
                group["lr"] = c.unet_lr * cosine_lr(step, c.unet_steps, c.warmup_steps)
            pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
            per_sample = weighted_mse(pred, noise, masks[index], c.foreground_weight)  # [B]
            if c.min_snr_gamma > 0:
                snr = alphas[t] / (1 - alphas[t])
                per_sample = per_sample * torch.clamp(snr, max=c.min_snr_gamma) / snr
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            ema.step(params)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % c.checkpoint_every == 0 and step + 1 < c.unet_steps:
                self.save_training("unet", step + 1, modules, optimizer, ema)
        ema.copy_to(params)           # the exported weights are the EMA's

        def write(tmp: Path):
            unet.save_pretrained(tmp / "unet")
            text_encoder.save_pretrained(tmp / "text_encoder")
            tokenizer.save_pretrained(tmp / "tokenizer")
            scheduler.save_pretrained(tmp / "scheduler")
        self.finish("unet", write, {"steps": c.unet_steps, "last_loss": round(loss.item(), 4)})

    def stage_scorer(self):
        c = self.config
        write, summary = self.world.train_scorer(self.load_data("scorer"), c, self.log)
        self.finish("scorer", lambda tmp: write(tmp / "scorer"), summary)

    def stage_export(self):
        """fp16 StableDiffusionPipeline folder (+ scorer/, pretrain config); DDIM for sampling."""
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        unet_dir = self.stage_dir("unet")
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(self.stage_dir("vae") / "vae"),
            text_encoder=CLIPTextModel.from_pretrained(unet_dir / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(unet_dir / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(unet_dir / "unet"),
            scheduler=DDIMScheduler.from_pretrained(unet_dir / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

        def write(tmp: Path):
            pipe.to(torch.float16).save_pretrained(tmp)
            # fp16 on disk, but a plain from_pretrained must give fp32 throughout: diffusers loads the
            # UNet and VAE in fp32 by default, transformers would keep the config's dtype.
            config_file = tmp / "text_encoder" / "config.json"
            config = json.loads(config_file.read_text())
            config["dtype"] = "float32"
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            shutil.copytree(self.stage_dir("scorer") / "scorer", tmp / "scorer")
            (tmp / "pretrain_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        atomic_folder(self.out / "model", write)
        self.finish("export", lambda tmp: None, {"model": str(self.out / "model")})

    def stage_evaluate(self):
        c = self.config
        metrics = self.world.evaluate(self.out / "model", seeds=c.eval_seeds, steps=c.eval_steps,
                                      guidance_scale=c.guidance_scale, grid=self.out / "model" / "samples.png")
        timings = json.loads((self.out / "timings.json").read_text()) if (self.out / "timings.json").exists() else {}
        metrics["pretrain_seconds"] = timings
        atomic_write(self.out / "model" / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=1)))
        self.finish("evaluate", lambda tmp: None, {k: v for k, v in metrics.items() if k != "pretrain_seconds"})


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """pred, target [B,C,h,w], masks [B,H,W] bool (H a multiple of h) -> [B] mean squared error with
    the object's latent pixels weighted `foreground_weight` against 1; normalised per sample, so
    a weight of 1 is plain MSE and the loss keeps its scale."""
    error = (pred - target).pow(2).mean(dim=1)                                   # [B,h,w]
    if foreground_weight == 1.0:
        return error.mean(dim=(1, 2))
    cover = F.adaptive_avg_pool2d(masks[:, None].float(), error.shape[-2:])[:, 0]  # [B,h,w] object share
    weight = 1 + (foreground_weight - 1) * cover
    return (weight * error).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))


def combination_balanced(combination: np.ndarray) -> np.ndarray:
    """[N] combination ids -> [N] drawing probabilities: every combination equally likely, uniform within one."""
    _, inverse, counts = np.unique(combination, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.sum()


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(images[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def config_from_overrides(overrides: list[str], saved: dict | None = None, world: str | None = None) -> PretrainConfig:
    """`key=value` (sizes.key=value for model sizes) over `saved` (a run's config.json) or the
    defaults of `world`, typed and checked like train.py's --set: an unknown key lists the valid ones."""
    if saved is not None:
        raw = saved
    else:
        world = world or PretrainConfig.world
        if world not in WORLDS:
            raise ValueError(f"world: {world!r} is not one of {', '.join(WORLDS)}")
        raw = {**json.loads(json.dumps(WORLDS[world].defaults)), "world": world}
    for item in overrides:
        apply_override(raw, *parse_override(item))
    config = build_dataclass(PretrainConfig, raw, "")
    if config.world not in WORLDS:
        raise ValueError(f"world: {config.world!r} is not one of {', '.join(WORLDS)}")
    if config.balance_combinations and WORLDS[config.world].combination is None:
        raise ValueError(f"balance_combinations: world {config.world!r} names no combinations to balance")
    return config
