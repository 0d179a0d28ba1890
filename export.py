"""Export a run's words as embedding files for other tools: encode each word once from its source
(an object folder, or explicit angles for the pose), write it for diffusers and AUTOMATIC1111 /
ComfyUI, and a manifest.

    python export.py --run runs/default --shape-from my_chairs/chair_001 --pose azimuth=30,elevation=10

writes runs/default/export/:

    default_shape.safetensors         diffusers: pipe.load_textual_inversion(path); prompt word default_shape
    default_shape.a1111.safetensors   A1111 / ComfyUI embeddings folder ({"emb_params": [K, D]})
    default_pose.safetensors, default_pose.a1111.safetensors
    (SDXL: default_shape.safetensors with clip_l and clip_g, for all three tools)
    manifest.json                     base model, tokens, files, sources, run, checkpoint step, seeds

The words are encoded in eval mode at diversity 0 (the shape code's mean), so an export is
deterministic. Only the words the run trained can be exported.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from guided_concepts.checkpointing import latest_checkpoint, load_state
from guided_concepts.concepts import CONCEPTS
from guided_concepts.configs.schema import ConfigError
from guided_concepts.rundata import load_run_config
from guided_concepts.generate import add_source_args, concept_reference_batch, load_run, sources_from_args
from guided_concepts.system import to_device
from guided_concepts.objectdata import DataError
from guided_concepts.tokens import TokenError
from guided_concepts.tokens.export import SDXL_KEYS, safe_token_name, save_a1111, save_diffusers, save_sdxl, write_manifest
from guided_concepts.argtypes import device as device_type
from guided_concepts.cli import entry_point

A1111_SUFFIX = ".a1111.safetensors"


def source_flags() -> list[str]:
    """Every flag that can give a word: --<name>-from, and each concept's own (e.g. --pose)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_source_args(parser)
    return [flag for action in parser._actions for flag in action.option_strings]


def _check_sources(sources: dict, trained: list[str], run_dir: Path, concept_configs: dict | None = None):
    if not sources:
        raise ValueError(f"nothing to export: give a source for at least one word ({', '.join(source_flags())})")
    unknown = [n for n in sources if n not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept {unknown[0]!r}; valid: {', '.join(CONCEPTS)}")
    untrained = [n for n in sources if n not in trained]
    if untrained:
        n = untrained[0]
        raise ValueError(f"{run_dir}: this run did not train {n!r} (trained: {', '.join(trained)}), "
                         f"so there is no {n} word to export; drop --{n}-from")
    for name, source in sources.items():
        if isinstance(source, dict) and not CONCEPTS[name].concept.value_flags:
            takers = [n for n in CONCEPTS if CONCEPTS[n].concept.value_flags]
            raise ValueError(f"{name}: explicit values are only for the {', '.join(takers)}; give an object folder")
        if source is None or (not isinstance(source, dict) and not str(source)):
            raise ValueError(f"{name}: empty source")
        if isinstance(source, dict) and concept_configs is not None:
            CONCEPTS[name].concept.source_batch(source, concept_configs[name])   # its checks, before the model loads


def _resolve_checkpoint(run_dir: Path, checkpoint) -> tuple[Path, int]:
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    state = ckpt / "state.json"
    if not state.is_file() or not (ckpt / "heads.safetensors").is_file():
        raise ConfigError(f"{ckpt}: not a checkpoint folder (needs state.json and heads.safetensors)")
    return ckpt, load_state(ckpt)["step"]


def _encode(system, cfg, name: str, source, view: int) -> tuple[torch.Tensor, dict]:
    """-> (vectors [K, D], the source as recorded in the manifest)."""
    concept = system.heads[name]
    config = cfg.concepts[name]
    batch = CONCEPTS[name].concept.source_batch(source, config)
    if batch is not None:          # given in values (e.g. --pose azimuth=30)
        recorded = CONCEPTS[name].concept.source_record(batch)
    else:
        batch = concept_reference_batch(source, view, cfg, name)
        recorded = {"type": "object", "path": str(Path(source).resolve()), "object": batch["object_name"][0]
                    if "object_name" in batch else Path(source).name, "view": view}
    device = next(system.backbone.unet.parameters()).device
    batch = to_device(batch, device)
    concept.eval()
    concept.apply_generation_options({})           # the defaults (e.g. *s from the masks)
    concept.diversity = 0.0                        # the shape code's mean: deterministic
    concept.noise_generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vectors = concept.encode(batch).embeds[0].detach().float().cpu()
    return vectors, recorded


def source_label(sources: dict) -> str:
    """A folder name for a set of sources: object folder names, cameras as az<A>_el<E>."""
    parts = []
    for value in dict.fromkeys(str(v) if not isinstance(v, dict) else
                               f"az{v['azimuth']:g}_el{v.get('elevation') or 0:g}" for v in sources.values()):
        parts.append(Path(value).name if "/" in value or Path(value).exists() else value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(parts)).strip("._-") or "sources"


def export_tokens(run_dir: str | Path, sources: dict, out_dir: str | Path | None = None, view: int = 0,
                  checkpoint: str | Path | None = None, device: str = "cpu", pt: bool = False) -> Path:
    """Encode each word from its source and write it for diffusers and A1111/ComfyUI. -> manifest path.

    sources: concept -> object folder, or values its own flags gave (e.g. a camera dict for the pose).
    out_dir: default <run>/export/<sources>, e.g. export/chair_001+az30_el10, so exports of
    different objects do not overwrite each other. pt: also write the legacy A1111 `.pt` file.
    """
    run_dir = Path(run_dir)
    run_cfg = load_run_config(run_dir)
    trained = list(run_cfg.tokens)
    sources = {k: v for k, v in sources.items() if v is not None}
    _check_sources(sources, trained, run_dir, run_cfg.concepts)
    ckpt, step = _resolve_checkpoint(run_dir, checkpoint)
    system, cfg = load_run(run_dir, ckpt, device)
    dims = system.table.embedding_dims
    if len(dims) > 2:
        raise ValueError(f"export writes SD 1.x/2.x (one text encoder) and SDXL (two) words; this run has {len(dims)}")
    if pt and len(dims) == 2:
        raise ValueError("--pt: the legacy A1111 .pt embedding is for SD 1.x/2.x; SDXL words are written as "
                         "clip_l/clip_g safetensors, which A1111 and ComfyUI read")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export" / source_label(sources)
    run_name = run_dir.resolve().name
    encoded = {n: _encode(system, cfg, n, sources[n], view) for n in system.tokens if n in sources}
    entries = []
    for name, (vectors, recorded) in encoded.items():     # all encoded before anything is written
        token = safe_token_name(run_name, name)
        if len(dims) == 2:       # one file for A1111, ComfyUI and diffusers (loaded once per encoder)
            files = {"sdxl": f"{token}.safetensors"}
            save_sdxl(out_dir / files["sdxl"], token, vectors, dims, step=step, base_model=cfg.model.name)
        else:
            files = {"diffusers": f"{token}.safetensors", "a1111": f"{token}{A1111_SUFFIX}"}
            save_diffusers(out_dir / files["diffusers"], token, vectors)
            save_a1111(out_dir / files["a1111"], token, vectors, step=step, base_model=cfg.model.name)
            if pt:
                files["a1111_pt"] = f"{token}.pt"
                save_a1111(out_dir / files["a1111_pt"], token, vectors, step=step, base_model=cfg.model.name)
        entries.append({
            "concept": name, "placeholder": system.heads[name].config.token, "token": token,
            "a1111_word": Path(next(iter(files.values())) if len(dims) == 2 else files["a1111"]).name[:-len(".safetensors")],
            "files": files, "num_vectors": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
            **({"encoders": dict(zip(SDXL_KEYS, dims))} if len(dims) == 2 else {}),
            "source": recorded, "run": run_name, "checkpoint": str(ckpt.resolve()), "checkpoint_step": step,
            "seed": cfg.train.seed, "diversity": 0.0,
        })
    base = {"name": cfg.model.name, "revision": cfg.model.revision, "path": str(system.backbone.path),
            "kind": system.backbone.kind}
    return write_manifest(out_dir, entries, base, seeds={"train": cfg.train.seed, "sample": cfg.sample.seed},
                          run={"name": run_name, "folder": str(run_dir.resolve()), "trained": trained,
                               "checkpoint": str(ckpt.resolve()), "checkpoint_step": step})


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    add_source_args(p)
    p.add_argument("--view", type=int, default=0, help="which view of each reference object")
    p.add_argument("--out", help="output folder (default: <run>/export)")
    p.add_argument("--pt", action="store_true", help="also write the legacy A1111 .pt embedding")
    p.add_argument("--device", type=device_type, default="cpu")
    args = p.parse_args(argv)
    try:
        sources = sources_from_args(args, CONCEPTS)
        manifest = export_tokens(args.run, sources, args.out, args.view, args.checkpoint, args.device, args.pt)
    except (ConfigError, DataError, TokenError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    for entry in json.loads(manifest.read_text())["tokens"]:
        print(f"{entry['concept']}: {', '.join(str(manifest.parent / f) for f in entry['files'].values())}")
    print(f"wrote {manifest}")
    return manifest


if __name__ == "__main__":
    entry_point(main)
