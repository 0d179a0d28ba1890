"""Learned words as files other tools load.

- diffusers: `{token: [K, D]}` safetensors, what `StableDiffusionPipeline.load_textual_inversion`
  reads (the `learned_embeds.safetensors` layout). `save_token` / `save_diffusers`.
- AUTOMATIC1111 / ComfyUI: `{"emb_params": [K, D]}` safetensors (one word per file; the word is
  the file name), or the legacy `.pt` dict `{"string_to_param": {"*": [K, D]}, "name", "step"}`.
  diffusers loads both too (pass `token=` for the safetensors one). `save_a1111`.
- SDXL (two text encoders): `{"clip_l": [K, 768], "clip_g": [K, 1280]}` safetensors, the layout
  A1111 and ComfyUI read for SDXL; diffusers loads it once per encoder:
  `pipe.load_textual_inversion(f["clip_l"], token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`
  and the same with `f["clip_g"]`, `pipe.text_encoder_2`, `pipe.tokenizer_2`. `save_sdxl`.
- `manifest.json`: which file holds which word, from which source, run and checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from guided_concepts.checkpointing import atomic_write

A1111_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")      # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)
MANIFEST_VERSION = 1


def _vectors(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.detach().float().cpu()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2:
        raise ValueError(f"expected vectors [K, D], got shape {tuple(vectors.shape)}")
    return vectors.contiguous()


def save_token(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """vectors: [K, D]. Writes {token: [K, D]} as safetensors, atomically."""
    path = Path(path)
    tensors = {token: vectors.detach().float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def load_token(path: str | Path) -> tuple[str, torch.Tensor]:
    """-> (token, vectors [K, D]); an SDXL file gives its two parts concatenated (clip_l, clip_g)."""
    tensors = load_file(str(path))
    if set(tensors) == set(SDXL_KEYS):
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            token = (f.metadata() or {}).get("name", Path(path).stem)
        return token, torch.cat([tensors[k] for k in SDXL_KEYS], dim=-1)
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one token, found keys {sorted(tensors)}")
    (token, vectors), = tensors.items()
    return token, vectors


def _shareable(path: Path) -> Path:
    """atomic_write's temp files are private (0600); exported files get the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


# -- names --------------------------------------------------------------------------------------
def _default_placeholders() -> dict[str, str]:
    from guided_concepts.concepts import CONCEPTS
    return {CONCEPTS[n].config().token: n for n in CONCEPTS}


def safe_token_name(run_name: str, concept: str) -> str:
    """A file- and prompt-safe word for one run's concept: ('default', 'shape') -> 'default_shape'.

    `concept` is a concept name or its default placeholder word (`*s` -> shape). Only
    [A-Za-z0-9_.-] remain (anything else becomes '_'); no leading '.' or '-' (hidden files,
    command-line flags).
    """
    concept = _default_placeholders().get(concept, concept)

    def clean(text: str) -> str:
        text = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))
        return re.sub(r"_+", "_", text).strip("_").lstrip(".-")

    run, name = clean(run_name), clean(concept)
    if not name:
        raise ValueError(f"concept {concept!r} has no filesystem-safe characters")
    if len(run) > MAX_RUN_PART:     # a file name holds 255 bytes: with the suffix and a temp file's, keep 200
        run = f"{run[:MAX_RUN_PART - 9]}_{hashlib.sha256(run.encode()).hexdigest()[:8]}"
    return f"{run}_{name}" if run else name


MAX_RUN_PART = 120      # the run's part of a word's name: shortened, with a hash that keeps it unique


# -- formats ------------------------------------------------------------------------------------
def save_diffusers(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers textual inversion: {token: [K, D]} (pipe.load_textual_inversion(path))."""
    return _shareable(save_token(path, token, _vectors(vectors)))


def save_a1111(path: str | Path, token: str, vectors: torch.Tensor, step: int | None = None,
               base_model: str | None = None) -> Path:
    """AUTOMATIC1111 / ComfyUI embedding, one word per file. The layout follows the suffix:

    - `.safetensors`: {"emb_params": [K, D]} (A1111 and ComfyUI name the word after the file;
      diffusers: pipe.load_textual_inversion(path, token=token)).
    - `.pt`: {"string_to_token": {"*": 265}, "string_to_param": {"*": [K, D]}, "name": token,
      "step": step, "sd_checkpoint": None, "sd_checkpoint_name": base_model} (torch.save's zip,
      keeping only the records A1111's safe unpickler accepts: `_a1111_pt_bytes`).
    """
    path = Path(path)
    vectors = _vectors(vectors)
    if path.suffix == ".safetensors":
        metadata = {"name": token, "format": "a1111"}
        if step is not None:
            metadata["step"] = str(int(step))
        atomic_write(path, lambda tmp: save_file({A1111_KEY: vectors}, str(tmp), metadata=metadata))
    elif path.suffix == ".pt":
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token,
                "step": None if step is None else int(step), "sd_checkpoint": None,
                "sd_checkpoint_name": base_model}
        blob = _a1111_pt_bytes(data)
        atomic_write(path, lambda tmp: tmp.write_bytes(blob))
    else:
        raise ValueError(f"{path}: an A1111 embedding file ends in .safetensors or .pt")
    return _shareable(path)


# AUTOMATIC1111's modules/safe.py refuses a .pt zip holding any other record ("the file may be
# malicious"); torch 2.x adds .format_version, .storage_alignment, byteorder, .data/serialization_id.
# (Older A1111 releases allow only these three; v1.10 also byteorder and .data/serialization_id.)
# torch.load reads the file without them (byteorder: little-endian is its default).
_A1111_RECORDS = re.compile(r"^[^/]+/(data\.pkl|data/\d+|version)$")


def _a1111_pt_bytes(data: dict) -> bytes:
    """torch.save(data) as bytes, rewritten with only the zip records A1111 allows (same folder,
    stored uncompressed as torch writes them, fixed timestamps so the same words give the same file)."""
    saved, out = io.BytesIO(), io.BytesIO()
    torch.save(data, saved)
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            # (a big-endian machine keeps byteorder, or loaders would read its floats as little-endian)
            if _A1111_RECORDS.match(info.filename) or (sys.byteorder == "big" and info.filename.endswith("/byteorder")):
                dst.writestr(zipfile.ZipInfo(info.filename), src.read(info))
    return out.getvalue()


def save_sdxl(path: str | Path, token: str, vectors: torch.Tensor, dims: list[int], step: int | None = None,
              base_model: str | None = None) -> Path:
    """SDXL embedding: vectors [K, d_l + d_g] split into {"clip_l": [K, d_l], "clip_g": [K, d_g]}."""
    vectors = _vectors(vectors)
    if len(dims) != len(SDXL_KEYS) or sum(dims) != vectors.shape[1]:
        raise ValueError(f"an SDXL embedding needs two encoders' parts summing to {vectors.shape[1]}, got {dims}")
    parts = dict(zip(SDXL_KEYS, (p.contiguous() for p in vectors.split(list(dims), dim=-1))))
    metadata = {"name": token, "format": "sdxl"}
    if step is not None:
        metadata["step"] = str(int(step))
    if base_model is not None:
        metadata["base_model"] = str(base_model)
    atomic_write(Path(path), lambda tmp: save_file(parts, str(tmp), metadata=metadata))
    return _shareable(Path(path))


def save_word(path: str | Path, token: str, vectors: torch.Tensor, dims: list[int]) -> Path:
    """One word for the backbone it was trained on: diffusers' layout with one text encoder, SDXL's
    clip_l/clip_g with two."""
    return save_sdxl(path, token, vectors, dims) if len(dims) == 2 else save_token(path, token, vectors)


def load_a1111(path: str | Path) -> torch.Tensor:
    """The [K, D] vectors of an A1111 embedding (either layout)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if A1111_KEY not in tensors:
            raise ValueError(f"{path}: no {A1111_KEY!r} key (found {sorted(tensors)})")
        return tensors[A1111_KEY]
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["string_to_param"]["*"]


def write_manifest(folder: str | Path, entries: list[dict], base_model: dict | str, seeds: dict | None = None,
                   **extra) -> Path:
    """folder/manifest.json (atomically): the base model, the seeds, and one entry per exported word
    (concept, token, files, num_vectors, dim, source, run, checkpoint step, ...)."""
    path = Path(folder) / "manifest.json"
    manifest = {"format_version": MANIFEST_VERSION,
                "base_model": {"name": base_model} if isinstance(base_model, str) else dict(base_model),
                "seeds": dict(seeds or {}), **extra, "tokens": list(entries)}
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return _shareable(path)
