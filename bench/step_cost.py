"""What a joint multi-token training step costs against plain textual inversion (the floor).

    python -m bench.step_cost                       # both tiny layouts, writes BENCHMARKS.md's table
    python -m bench.step_cost --layouts tiny-sd15 --steps 30 --profile

One process, one backbone folder, one fixed batch of the bundled chairs per layout; variants:
  (a) plain textual inversion: one free embedding, stock fused attention, plain denoising MSE
  (b) the shape word: its head (mask-set encoder) and the mask cross-attention loss
  (c) all four words with every guidance loss
  (d) (b) with attention capture off (mask weight 0: training then runs the UNet uncaptured)
Steps run in interleaved rounds (one step of each variant per round, shuffled), so drift in the
machine's speed hits all alike. Each: median step time over --steps rounds after --warmup; peak memory above the loaded model (RSS on
CPU, sampled every 2 ms in separate steps so sampling does not perturb the timing;
torch.cuda.max_memory_allocated on GPU); bytes autograd saves for backward in one step.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from guided_concepts import train
from guided_concepts.rundata import derived_settings, with_derived
from guided_concepts.concepts import CONCEPTS
from guided_concepts.objectdata import TripletBatchSampler, collate
from guided_concepts.system import build_system, load_backbone_for, to_device
from guided_concepts.prompts import make_prompts, prompts_for
from guided_concepts.objective import training_losses

LAYOUTS = {   # layout -> (train.py arguments, batch size)
    "tiny": (["--model", "tiny"], 9),
    "tiny-sd15": (["--model", "tiny-sd15", "--set", "data.resolution=512"], 3),
}
VARIANTS = {  # variant -> (tokens, extra overrides); (a) is built by hand below
    "a_textual_inversion": (["shape"], []),
    "b_shape": (["shape"], []),
    "c_all_four": (list(CONCEPTS), []),          # every registered word
    "d_shape_no_capture": (["shape"], ["--set", "losses.shape.mask_weight=0"]),
}


@dataclass
class Result:
    layout: str
    variant: str
    step_ms: float
    spread_ms: float          # half the interquartile range of the step times
    peak_mb: float
    saved_mb: float
    terms: list[str]


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:                      # glibc keeps freed pages; hand them back so baselines are honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory_above_baseline(step, repeats: int, device: torch.device) -> float:
    """Bytes above the memory held before the steps (model, heads, optimizer state)."""
    release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base, peak, running = rss_bytes(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(repeats):
        step()
    running[0] = False
    thread.join()
    return max(0, peak[0] - base)


def saved_for_backward(step) -> int:
    """Bytes of the tensors autograd keeps for backward during one step (activations)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


# ----------------------------------------------------------------------------------------------
# Steps: (b)-(d) are train.py's step; (a) is textual inversion on the same backbone and batch
# ----------------------------------------------------------------------------------------------
def build(layout: str, variant: str, device: torch.device):
    args, batch_size = LAYOUTS[layout]
    tokens, extra = VARIANTS[variant]
    cfg, _ = train.parse_args([*args, "--tokens", ",".join(tokens), *extra])
    train_set, val_set = train.build_data(cfg)
    cfg = with_derived(cfg, derived_settings(cfg, train_set, val_set))     # camera bounds, as a run's
    backbone = load_backbone_for(cfg)
    system = build_system(cfg, backbone)
    for module in backbone.frozen_modules():
        module.to(device)
    system.heads.to(device)
    sampler = TripletBatchSampler(train_set, max(1, batch_size // 3), seed=0)
    batch = to_device(collate([train_set[i] for i in next(iter(sampler))]), device)
    generator = torch.Generator().manual_seed(0)
    system.heads.set_noise_generator(generator)
    rng = random.Random(0)

    if variant == "a_textual_inversion":
        from diffusers.models.attention_processor import AttnProcessor2_0
        backbone.unet.set_attn_processor(AttnProcessor2_0())          # stock fused attention everywhere
        rows = system.table.initializer_rows["shape"].to(device)
        word = torch.nn.Parameter(rows.clone()[None])                   # [1, K, D], the only trainable tensor
        optimizer = torch.optim.AdamW([word], lr=5e-3)
        prompts = prompts_for(batch["category"], cfg.prompt.templates, system.clauses, ["shape"], rng)

        def step():
            with torch.no_grad():
                latents = backbone.vae.encode(batch["image"]).latent_dist.sample(generator) * backbone.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator).to(device)
            t = torch.randint(0, backbone.scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
            text, _ = system.text_conditioning(prompts, {"shape": SimpleNamespace(embeds=word.expand(len(latents), -1, -1))})[:2]
            pred = backbone.unet(backbone.scheduler.add_noise(latents, noise, t), t, text).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return ["denoise"]
        return step

    groups = [{"params": [p for p in system.heads[n].parameters() if p.requires_grad], "lr": cfg.concepts[n].lr}
              for n in cfg.tokens]
    optimizer = torch.optim.AdamW(groups)
    params = [p for g in groups for p in g["params"]]

    def step():
        prompts, present = make_prompts(batch["category"], cfg.prompt.templates, system.clauses, rng, cfg.train.union_sampling)
        encoded = system.heads(batch)
        terms = training_losses(system, batch, prompts, generator, present=present, encoded=encoded)
        loss = sum(w * v.float().mean() for w, v in terms.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sorted(terms)
    return step


def measure_layout(layout: str, variants: list[str], steps: int, warmup: int, device: torch.device,
                   profile: bool) -> list[Result]:
    """Time the variants in interleaved rounds (a b c d, a b c d, ... in a shuffled order per
    round), so drift in the machine's speed hits every variant alike; then memory, one by one."""
    built = {v: build(layout, v, device) for v in variants}
    terms = {v: [] for v in variants}
    for v, step in built.items():
        for _ in range(warmup):
            terms[v] = step()
    times = {v: [] for v in variants}
    order = list(variants)
    for round_ in range(steps):
        random.Random(round_).shuffle(order)
        for v in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            built[v]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - started)
    results = []
    for v in variants:
        peak = peak_memory_above_baseline(built[v], 3, device)
        saved = saved_for_backward(built[v])
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch_profile(activities=activities) as prof:
                for _ in range(3):
                    built[v]()
            print(f"\n== {layout} {v}: top ops by self time ==")
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15))
        q = statistics.quantiles(times[v], n=4)
        results.append(Result(layout, v, 1000 * statistics.median(times[v]), 1000 * (q[2] - q[0]) / 2,
                              peak / 2**20, saved / 2**20, terms[v]))
    built.clear()
    release_memory()
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
TARGETS = {"b/a time": 1.15, "c/a time": 1.35, "b/d memory": 1.10}


def table(results: list[Result], command: str, device: str) -> str:
    lines = [f"Device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"Command: `{command}`", "",
             "| layout | variant | step (ms, median ± half IQR) | peak memory above model (MB) | saved for backward (MB) | loss terms |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.layout} | {r.variant} | {r.step_ms:.1f} ± {r.spread_ms:.1f} | {r.peak_mb:.1f} | {r.saved_mb:.1f} | "
                     f"{len(r.terms)}: {', '.join(r.terms)} |")
    lines += ["", "| layout | (b)/(a) time | (c)/(a) time | (b)/(d) peak memory | (b)/(d) saved for backward |",
              "|---|---|---|---|---|"]
    for layout in dict.fromkeys(r.layout for r in results):
        by = {r.variant[0]: r for r in results if r.layout == layout}
        if not all(k in by for k in "abcd"):
            continue
        ratios = [by["b"].step_ms / by["a"].step_ms, by["c"].step_ms / by["a"].step_ms,
                  by["b"].peak_mb / max(by["d"].peak_mb, 1e-9), by["b"].saved_mb / by["d"].saved_mb]
        marks = [f"{x:.2f}" + (f" ({'meets' if x <= t else 'misses'} ≤ {t})" if layout == "tiny-sd15" else "")
                 for x, t in zip(ratios, [*TARGETS.values(), TARGETS["b/d memory"]])]
        lines.append(f"| {layout} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="tiny,tiny-sd15", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per variant")
    p.add_argument("--out", help="write the table to this markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for layout in args.layouts.split(","):
        for r in measure_layout(layout, args.variants.split(","), args.steps, args.warmup, device, args.profile):
            results.append(r)
            print(f"{layout:10s} {r.variant:20s} {r.step_ms:8.1f} ± {r.spread_ms:5.1f} ms  peak +{r.peak_mb:7.1f} MB  "
                  f"saved {r.saved_mb:7.1f} MB", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    text = table(results, "python -m bench.step_cost " + " ".join(argv if argv is not None else os.sys.argv[1:]), name)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
