"""SDXL on `tiny-sdxl` (built from config): both text encoders, the pooled embedding and time ids,
capture at SDXL's layout, a run with resume, and exported words in a plain StableDiffusionXLPipeline."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from guided_concepts.capture import AttentionStore, CaptureProcessor, capture_attention, choose_layers, cross_attention_layers
from tests.conftest import make_system
from guided_concepts.prompts import prompts_for
from guided_concepts.objective import training_losses
from guided_concepts import sampling

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a chair in the shape of {} with pose {}"


@pytest.fixture(scope="session")
def sdxl_dir() -> Path:
    from guided_concepts.backbone import ensure_tiny_model
    return ensure_tiny_model(layout="tiny-sdxl")


@pytest.fixture
def sdxl_backbone(sdxl_dir):
    from guided_concepts.backbone import load_backbone
    return load_backbone(str(sdxl_dir))


def test_sdxl_is_detected_from_the_folder(sdxl_backbone, fresh_backbone):
    assert sdxl_backbone.is_sdxl and sdxl_backbone.kind == "sdxl" and len(sdxl_backbone.text_side) == 2
    assert not fresh_backbone.is_sdxl and len(fresh_backbone.text_side) == 1
    system = make_system(sdxl_backbone, tokens=("shape", "pose"))
    assert system.table.embedding_dims == [32, 48]          # clip_l | clip_g, as 768 | 1280 in SDXL
    for (tokenizer, encoder), ids in zip(sdxl_backbone.text_side, system.table.token_ids):
        assert tokenizer.convert_tokens_to_ids("*s") == ids["shape"][0]     # on both tokenizers
    row = system.table.initializer_rows["shape"]
    parts = [te.get_input_embeddings().weight[tok("object", add_special_tokens=False).input_ids[0]]
             for tok, te in sdxl_backbone.text_side]
    assert torch.equal(row, torch.cat(parts))


def test_fresh_words_reproduce_the_stock_pipeline_embeddings_and_pooled(sdxl_backbone, sdxl_dir):
    """Words at their initializers: '*s' / '*p' encode exactly as the stock SDXL pipeline encodes
    'object' / 'view' (penultimate layers of both encoders, and text_encoder_2's pooled output)."""
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    with torch.no_grad():
        expected, _, pooled_expected, _ = pipe.encode_prompt(PROMPT.format("object", "view"), device="cpu",
                                                             do_classifier_free_guidance=False)
        system = make_system(sdxl_backbone, tokens=("shape", "pose"), concepts={"pose": {"initializer": "view"}})
        # One prompt, as the pipeline encodes it (a batch of 2 takes another matmul kernel for the
        # pooled projection: equal to 1e-7, not bit for bit).
        words = {n: type("Out", (), {"embeds": system.table.initializer_rows[n].expand(1, 1, -1)})() for n in system.tokens}
        got, _, pooled = system.text_conditioning([PROMPT.format("*s", "*p")], words)
        # The pooled embedding reflects the words: another shape word moves it.
        moved = {**words, "shape": type("Out", (), {"embeds": torch.randn(1, 1, 80)})()}
        _, _, pooled_moved = system.text_conditioning([PROMPT.format("*s", "*p")], moved)
    assert got.shape == (1, 77, 80) and pooled.shape == (1, 32)
    assert torch.equal(got, expected) and torch.equal(pooled, pooled_expected)
    assert (pooled_moved - pooled).abs().max() > 1e-3


def test_capture_keeps_the_stock_output_at_the_sdxl_layout(sdxl_backbone):
    unet = sdxl_backbone.unet
    size = unet.config.sample_size                                       # 32: 64 px / VAE 2x
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    selection = torch.zeros(2, 77, 1)
    selection[:, 5, 0] = 1
    # No attention at the latent size (SDXL at 1024 px: none at 128, only 64 and 32); the default
    # is the 16x16 maps, and a size the model lacks is a clear error.
    with pytest.raises(ValueError, match=r"not in this model.*\[8, 16\]"):
        choose_layers(unet, size, [32])
    factors = cross_attention_layers(unet)
    assert {size // factors[n] for n in choose_layers(unet, size, None)} == {16}          # the default
    layers = choose_layers(unet, size, [8, 16])                          # every cross-attention layer
    assert any("transformer_blocks.1." in n for n in layers)             # the depth-2 blocks' second layers
    t = torch.tensor([10, 500])
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(latents, t, text, added_cond_kwargs=added).sample
        store = AttentionStore((size, size))
        store.set_prompts(text, selection)
        with capture_attention(unet, store, layers):
            kinds = {n: type(p) for n, p in unet.attn_processors.items()}
            captured = unet(latents, t, text, added_cond_kwargs=added).sample
    assert torch.equal(captured, stock)
    assert {n for n, k in kinds.items() if k is CaptureProcessor} == set(layers)
    assert set(store.maps) == set(layers) and store.collect().shape[:2] == (2, 1)


def test_a_joint_step_reaches_both_encoders_parts_and_nothing_frozen(sdxl_backbone, chair_batch):
    system = make_system(sdxl_backbone, tokens=("shape", "pose"), losses={"shape": {"mask_variant": "mass_ratio"}})
    frozen = {n: p.detach().clone() for n, p in sdxl_backbone.text_side[1][1].named_parameters()}
    encoded = system.heads(chair_batch)
    for out in encoded.values():
        out.embeds.retain_grad()
    prompts = prompts_for(chair_batch["category"], ["a {category} {phrases}"], system.clauses, system.tokens, __import__("random").Random(0))
    losses = training_losses(system, chair_batch, prompts, torch.Generator().manual_seed(0), encoded=encoded)
    sum(w * v.mean() for w, v in losses.values()).backward()
    for name, out in encoded.items():
        grad = out.embeds.grad                                           # [B, K, 80]
        assert grad[..., :32].abs().sum() > 0 and grad[..., 32:].abs().sum() > 0, name   # clip_l and clip_g parts
    assert all(p.grad is None for m in sdxl_backbone.frozen_modules() for p in m.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in sdxl_backbone.text_side[1][1].named_parameters())


def test_time_ids_come_from_the_data(tmp_path, sdxl_backbone):
    """A 96x64 (w x h) view trained at 32 px: original size (64, 96), crop corner (0, 8) in
    training pixels (16 file pixels; diffusers' SDXL training resizes to 48x32, then crops 8),
    target (32, 32)."""
    import numpy as np
    from PIL import Image

    from guided_concepts.objectdata import ObjectViewsDataset, collate, scan_objects
    folder = tmp_path / "objects" / "chair_000"
    (folder / "views").mkdir(parents=True)
    (folder / "masks").mkdir()
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 32:64] = 255
    Image.fromarray(np.stack([mask] * 3, -1)).save(folder / "views" / "000.png")
    Image.fromarray(mask).save(folder / "masks" / "000.png")
    (folder / "meta.json").write_text(json.dumps({"category": "chair"}))
    batch = collate([ObjectViewsDataset(scan_objects(tmp_path / "objects"), 32, flip_prob=0.0)[0]])
    system = make_system(sdxl_backbone)
    added = system.backbone.added_conditioning(torch.zeros(1, 32), batch, 32)
    assert added["time_ids"].tolist() == [[64.0, 96.0, 0.0, 8.0, 32.0, 32.0]]
    assert system.backbone.added_conditioning(torch.zeros(2, 32), None, 64)["time_ids"].tolist() == [[64.0, 64, 0, 0, 64, 64]] * 2
    with pytest.raises(ValueError, match="needs added conditioning"):
        system.unet_with_attention(torch.zeros(1, 4, 32, 32), torch.tensor([1]), torch.zeros(1, 77, 80),
                                   torch.zeros(1, 77, 1), capture=False)


LOAD_IN_PLAIN_PIPELINE = r"""
import json, sys, torch
from pathlib import Path
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
model, folder = sys.argv[1], Path(sys.argv[2])
manifest = json.loads((folder / "manifest.json").read_text())
pipe = StableDiffusionXLPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
image = lambda prompt: pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images
before = image("a chair in the shape of object with pose view")
equal = True
for entry in manifest["tokens"]:
    f = load_file(str(folder / entry["files"]["sdxl"]))
    for key, tok, te in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        pipe.load_textual_inversion(f[key], token=entry["token"], text_encoder=te, tokenizer=tok)
        equal &= torch.equal(te.get_input_embeddings().weight[tok.convert_tokens_to_ids(entry["token"])], f[key][0])
words = {e["concept"]: e["token"] for e in manifest["tokens"]}
after = image(f"a chair in the shape of {words['shape']} with pose {words['pose']}")
project = sorted(m for m in sys.modules if m.split(".")[0] in ("system", "tokens", "concepts", "backbone", "train"))
print(json.dumps({"equal": bool(equal), "change": float((after - before).abs().max()), "project": project}))
"""


@pytest.mark.slow
def test_tiny_sdxl_run_resumes_exactly_exports_and_loads_in_a_plain_pipeline(tmp_path, sdxl_dir, chairs_dir):
    from guided_concepts import export
    from guided_concepts import train
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "--model", "tiny-sdxl", "--tokens", "shape,pose",
              "--set", f"run.output_dir={tmp_path}", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=0",
              "--set", "concepts.shape.lr=0.05", "--set", "concepts.pose.lr=0.05"]
    straight = train.main([*common, "--name", "straight", "--set", "train.steps=4"])
    train.main([*common, "--name", "resumed", "--set", "train.steps=2"])
    resumed = train.main([*common, "--name", "resumed", "--set", "train.steps=4", "--resume"])
    heads = [load_file(str(r / "checkpoints" / "step_000004" / "heads.safetensors")) for r in (straight, resumed)]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    # The run's own token files are SDXL files (clip_l, clip_g).
    token_file = next((straight / "tokens").glob("*/shape.safetensors"))
    assert {k: tuple(v.shape) for k, v in load_file(str(token_file)).items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}

    chair = sorted(p for p in chairs_dir.iterdir() if p.is_dir())[0]
    from guided_concepts import generate
    from PIL import Image
    picture = generate.main(["--run", str(straight), "--prompt", "a chair in the shape of *s with pose *p", "--shape-from",
                             str(chair), "--pose", "azimuth=30,elevation=10", "--num", "2", "--steps", "2",
                             "--out", str(tmp_path / "generated.png")])
    assert Image.open(picture).size[0] >= 2 * 64                         # two samples (and their attention)
    manifest = export.main(["--run", str(straight), "--shape-from", str(chair), "--pose", "azimuth=30,elevation=10",
                            "--out", str(tmp_path / "export")])
    recorded = json.loads(manifest.read_text())
    assert recorded["base_model"]["kind"] == "sdxl"
    assert all(e["encoders"] == {"clip_l": 32, "clip_g": 48} and e["dim"] == 80 for e in recorded["tokens"])
    with pytest.raises(SystemExit, match="legacy A1111 .pt embedding is for SD 1.x/2.x"):
        export.main(["--run", str(straight), "--shape-from", str(chair), "--out", str(tmp_path / "pt"), "--pt"])
    assert not (tmp_path / "pt").exists()
    # Per-object tuning (E4T's stage 2) writes SDXL token files too.
    from guided_concepts import tune
    tune.main(["--run", str(straight), "--object", str(chair), "--steps", "1", "--out", str(tmp_path / "tuned")])
    tuned = load_file(str(tmp_path / "tuned" / "tokens" / "shape.safetensors"))
    assert {k: tuple(v.shape) for k, v in tuned.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    # A fresh process that never imports the project: the rows equal the files, the image changes.
    out = subprocess.run([sys.executable, "-c", LOAD_IN_PLAIN_PIPELINE, str(sdxl_dir), str(manifest.parent)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["equal"] and result["project"] == [] and result["change"] > 1e-3


def test_fp16_keeps_the_sdxl_vae_in_fp32(sdxl_backbone, fresh_backbone):
    """SDXL's VAE overflows in fp16 (force_upcast): mixed precision leaves it fp32; bf16 casts it,
    and SD 1.x's VAE follows the run's dtype."""
    sdxl_backbone.cast_frozen(torch.float16)
    assert sdxl_backbone.vae.dtype == torch.float32 and sdxl_backbone.unet.dtype == torch.float16
    assert all(te.dtype == torch.float16 for _, te in sdxl_backbone.text_side)
    sdxl_backbone.cast_frozen(torch.bfloat16)
    assert sdxl_backbone.vae.dtype == torch.bfloat16
    fresh_backbone.cast_frozen(torch.float16)
    assert fresh_backbone.vae.dtype == torch.float16


def test_sampling_with_an_fp32_vae_under_fp16_matches_fp32(sdxl_dir):
    from guided_concepts.backbone import load_backbone
    images = []
    for dtype in (torch.float32, torch.float16):
        backbone = load_backbone(str(sdxl_dir))
        backbone.cast_frozen(dtype)
        system = make_system(backbone)
        word = {"shape": type("Out", (), {"embeds": system.table.initializer_rows["shape"].expand(1, 1, -1)})()}
        images.append(sampling.sample(system, ["a chair in the shape of *s"], steps=2, encoded=word)[0])
    assert images[1].dtype == torch.float32 and (images[0] - images[1]).abs().max() < 0.02


def test_the_sdxl_config_runs_on_tiny_sdxl(tmp_path, chairs_dir):
    """configs/sdxl.yaml's own settings (bf16, gradient checkpointing, cached latents) end to end,
    on the tiny SDXL at its 64 px."""
    from guided_concepts import train
    run = train.main(["--config", str(REPO / "configs" / "sdxl.yaml"), "--model", "tiny-sdxl", "--name", "xl",
                      "--set", f"run.output_dir={tmp_path}", "--set", "data.resolution=64", "--set", "data.root=null",
                      "--set", "train.steps=2", "--set", "train.sample_every=0", "--set", "sample.steps=2",
                      "--set", "train.log_every=1"])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    assert json.loads((run / "environment.json").read_text())[0]["mixed_precision"] == "bf16"


def test_lora_adapters_export_for_the_sdxl_pipeline(sdxl_backbone, sdxl_dir, tmp_path):
    """E4T-style per-object adapters on SDXL: the LoRA file loads with StableDiffusionXLPipeline's
    own loader and changes its UNet exactly as trained."""
    from diffusers import StableDiffusionXLPipeline

    from guided_concepts.backbone.adapters import AdapterConfig, UNetAdapters
    adapters = UNetAdapters(sdxl_backbone.unet, AdapterConfig(kind="lora", rank=2))
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        adapted = sdxl_backbone.unet(x, t, e, added_cond_kwargs=added).sample
    path = adapters.export_lora(tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    with torch.no_grad():
        base = pipe.unet(x, t, e, added_cond_kwargs=added).sample
    pipe.load_lora_weights(str(path.parent))
    with torch.no_grad():
        loaded = pipe.unet(x, t, e, added_cond_kwargs=added).sample
    assert not torch.allclose(loaded, base, atol=1e-4) and torch.allclose(loaded, adapted, atol=1e-4)


def test_pooled_embedding_is_read_at_the_end_token(sdxl_backbone):
    """SDXL's text_encoder_2 config has eos_token_id 2, for which transformers pools at
    input_ids.argmax() — an added word, since placeholder ids come after the end token. Ours is read
    at the end token (as SDXL was trained, and as A1111/ComfyUI pool), whatever that config says."""
    system = make_system(sdxl_backbone, tokens=("shape", "pose"))
    tokenizer, encoder = sdxl_backbone.text_side[1]
    encoder.config.eos_token_id = encoder.text_model.eos_token_id = 2          # SDXL base 1.0's setting
    prompt = PROMPT.format("*s", "*p")
    g = torch.Generator().manual_seed(0)
    words = {n: type("Out", (), {"embeds": torch.randn(1, 1, 80, generator=g)})() for n in system.tokens}
    with torch.no_grad():
        _, _, pooled = system.text_conditioning([prompt], words)
        ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        end = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        assert ids[0].argmax() != end                                         # the legacy rule would pick a word
        hidden = encoder(ids).last_hidden_state                               # words at their initializers here
        manual = encoder.text_projection(hidden[0, end])
        # The same prompt with the words at their initializer rows: ours equals the manual end-token read.
        rows = {n: type("Out", (), {"embeds": system.table.initializer_rows[n][None, None]})() for n in system.tokens}
        _, _, pooled_rows = system.text_conditioning([prompt], rows)
    assert torch.allclose(pooled_rows[0], manual, atol=1e-6)
    assert not torch.allclose(pooled, pooled_rows)                          # and the words move it


def test_sampling_equals_the_stock_sdxl_pipeline(sdxl_backbone, sdxl_dir):
    """Words at their initializers: our sampling (capture installed, our text side, zeros for the
    empty negative as the model says) gives the stock pipeline's image for the initializer prompt."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    system = make_system(sdxl_backbone)
    words = {"shape": type("Out", (), {"embeds": system.table.initializer_rows["shape"].expand(1, 1, -1)})()}
    ours, maps = sampling.sample(system, ["a chair in the shape of *s"], steps=3, guidance_scale=5.0, seed=3, encoded=words)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe("a chair in the shape of object", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert (ours - stock).abs().max() < 1e-5
    assert maps is not None and maps.shape[:2] == (1, 1)                      # the word's attention was captured
