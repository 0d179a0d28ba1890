"""export.py: a run's words as diffusers and A1111/ComfyUI embedding files plus a manifest."""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from guided_concepts import export
from guided_concepts import generate
from guided_concepts.concepts.pose import camera_batch
from guided_concepts import train
from guided_concepts.concepts import CONCEPTS, ConceptOutput
from guided_concepts.tokens.export import load_a1111, safe_token_name, save_a1111, save_diffusers

POSE = {"azimuth": 30.0, "elevation": 10.0, "distance": None}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, chairs_dir):
    out = tmp_path_factory.mktemp("export_runs")
    return train.main(["--name", "exp", "--set", f"run.output_dir={out}", "--tokens", "shape,pose",
                       "--set", "train.steps=2", "--set", "train.batch_size=6", "--set", "data.holdout=1",
                       "--set", "train.sample_every=0", "--set", "sample.steps=1", "--set", "sample.num_objects=1"])


@pytest.fixture(scope="module")
def exported(run, chairs_dir):
    """shape from chair_001, pose from explicit angles, into the default <run>/export/."""
    manifest = export.export_tokens(run, {"shape": chairs_dir / "chair_001", "pose": POSE}, pt=True)
    return manifest, json.loads(manifest.read_text())


@pytest.fixture(scope="module")
def system(run):
    return generate.load_run(run)


def entry(manifest_data, concept):
    return next(e for e in manifest_data["tokens"] if e["concept"] == concept)


def pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rows(pipe, token):
    ids = pipe.tokenizer.convert_tokens_to_ids([token])
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


def reference_vectors(system_cfg, concept, source):
    """What the run's head gives for `source` (eval mode, diversity 0), computed here directly."""
    system, cfg = system_cfg
    if isinstance(source, dict):
        batch = camera_batch(source, cfg.concepts["pose"].distance_range)
    else:
        batch = generate.reference_batch(source, 0, cfg.data.resolution, CONCEPTS[concept].concept.requirements(cfg.concepts[concept]).data,
                                         getattr(cfg.concepts[concept], "max_views", 0))
    system.eval()
    system.heads[concept].diversity = 0.0
    with torch.no_grad():
        return system.heads[concept].encode(batch).embeds[0]


def test_exported_vectors_are_the_heads_output(run, exported, system, chairs_dir, tmp_path):
    manifest, data = exported
    folder = manifest.parent
    shape = load_file(str(folder / "exp_shape.safetensors"))
    pose = load_file(str(folder / "exp_pose.safetensors"))
    assert list(shape) == ["exp_shape"] and list(pose) == ["exp_pose"]
    assert torch.allclose(shape["exp_shape"], reference_vectors(system, "shape", chairs_dir / "chair_001"), atol=1e-6)
    assert torch.allclose(pose["exp_pose"], reference_vectors(system, "pose", POSE), atol=1e-6)
    # A pose from other angles gives another word; the same angles give the same word again.
    other = export.export_tokens(run, {"pose": {"azimuth": -120.0, "elevation": 30.0, "distance": None}},
                                 out_dir=tmp_path)
    other_pose = load_file(str(other.parent / "exp_pose.safetensors"))["exp_pose"]
    assert not torch.allclose(other_pose, pose["exp_pose"])
    again = export.export_tokens(run, {"pose": POSE}, out_dir=tmp_path / "again")
    assert torch.equal(load_file(str(again.parent / "exp_pose.safetensors"))["exp_pose"], pose["exp_pose"])


def test_diffusers_file_loads_with_load_textual_inversion(exported, tiny_model_dir):
    manifest, data = exported
    e = entry(data, "shape")
    vectors = load_file(str(manifest.parent / e["files"]["diffusers"]))[e["token"]]
    pipe = pipeline(tiny_model_dir)
    pipe.load_textual_inversion(str(manifest.parent / e["files"]["diffusers"]))
    assert torch.allclose(rows(pipe, e["token"]), vectors, atol=1e-6)


def test_two_exported_words_in_one_pipeline_match_the_run_and_generate(exported, system, tiny_model_dir):
    manifest, data = exported
    s, p = entry(data, "shape"), entry(data, "pose")
    pipe = pipeline(tiny_model_dir)
    pipe.load_textual_inversion([str(manifest.parent / s["files"]["diffusers"]),
                                 str(manifest.parent / p["files"]["diffusers"])])
    prompt = f"a photo of a chair in the shape of {s['token']} with pose {p['token']}"
    # The pipeline's prompt embedding is the one the run itself builds for *s / *p.
    encoded = {}
    for n in ("shape", "pose"):
        vectors = load_file(str(manifest.parent / entry(data, n)["files"]["diffusers"]))[entry(data, n)["token"]]
        encoded[n] = ConceptOutput(embeds=vectors[None], offset=torch.zeros_like(vectors[None]))
    with torch.no_grad():
        ours = system[0].text_conditioning(["a photo of a chair in the shape of *s with pose *p"], encoded)[:2][0]
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    images = pipe(prompt, num_inference_steps=2, output_type="pt", height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_a1111_files_load_in_diffusers(exported, tiny_model_dir):
    manifest, data = exported
    e = entry(data, "shape")
    vectors = load_file(str(manifest.parent / e["files"]["diffusers"]))[e["token"]]
    a1111 = manifest.parent / e["files"]["a1111"]
    assert a1111.name == "exp_shape.a1111.safetensors" and list(load_file(str(a1111))) == ["emb_params"]
    assert torch.equal(load_a1111(a1111), vectors)
    pipe = pipeline(tiny_model_dir)
    pipe.load_textual_inversion(str(a1111), token=e["token"])
    assert torch.allclose(rows(pipe, e["token"]), vectors, atol=1e-6)
    # The legacy .pt layout (string_to_param) names its own word.
    pt = manifest.parent / e["files"]["a1111_pt"]
    raw = torch.load(pt, weights_only=True)
    assert raw["name"] == e["token"] and raw["step"] == e["checkpoint_step"]
    assert a1111_safe_check(pt)["name"] == e["token"]                 # A1111 itself would load it
    pipe = pipeline(tiny_model_dir)
    pipe.load_textual_inversion(str(pt))
    assert torch.allclose(rows(pipe, e["token"]), vectors, atol=1e-6)


# AUTOMATIC1111 (modules/safe.py, v1.10.1) before it torch.loads a .pt: the zip's record names and
# the globals its pickle may name; anything else is refused as "the file may be malicious".
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|(\.data\/serialization_id)|(data\.pkl))$")
A1111_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                 ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                 ("torch.nn.modules.container", "ParameterDict"), ("numpy.core.multiarray", "scalar"),
                 ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
                 ("_codecs", "encode"), ("__builtin__", "set"),
                 *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                           "ByteStorage", "float32", "BFloat16Storage"))}


def a1111_safe_check(path):
    """A1111's check_pt: every record name allowed, one data.pkl, and it unpickles with only the
    allowed globals (storages stubbed, as A1111 does). Raises as A1111 would; returns the object."""
    class Restricted(pickle.Unpickler):
        def persistent_load(self, saved_id):
            assert saved_id[0] == "storage"
            return torch.storage.TypedStorage(saved_id[4], dtype=torch.float32, _internal=True)

        def find_class(self, module, name):
            if (module, name) not in A1111_GLOBALS:
                raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
            return super().find_class(module, name)

    with zipfile.ZipFile(path) as z:
        bad = [n for n in z.namelist() if not A1111_ZIP_NAMES.match(n)]
        assert not bad, f"bad file inside {path}: {bad[0]}"
        pkl = [n for n in z.namelist() if re.match(r"^([^/]+)/data\.pkl$", n)]
        assert len(pkl) == 1, f"{path}: {len(pkl)} data.pkl"
        with z.open(pkl[0]) as f:
            return Restricted(f).load()


def test_a1111_pt_passes_a1111s_safe_unpickler(tmp_path):
    vectors = torch.randn(2, 32)
    path = save_a1111(tmp_path / "w.pt", "run_w", vectors, step=7, base_model="tiny")
    data = a1111_safe_check(path)
    assert data["name"] == "run_w" and data["step"] == 7 and data["string_to_param"]["*"].shape == (2, 32)
    loaded = torch.load(path, weights_only=True)                 # what A1111 then does (and diffusers)
    assert torch.equal(loaded["string_to_param"]["*"], vectors) and loaded["sd_checkpoint_name"] == "tiny"
    assert torch.equal(load_a1111(path), vectors)
    # The same word gives the same bytes (no timestamps or serialization ids in the file).
    assert save_a1111(tmp_path / "again.pt", "run_w", vectors, step=7, base_model="tiny").read_bytes() == path.read_bytes()
    # The checker itself refuses what A1111 refuses.
    torch.save({"x": vectors}, tmp_path / "plain.pt")
    with pytest.raises(AssertionError, match=r"bad file inside .*\.format_version"):
        a1111_safe_check(tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as evil:          # a global outside the allow-list
        evil.writestr("archive/data.pkl", pickle.dumps({"x": collections.Counter()}, protocol=2))
        evil.writestr("archive/version", "3\n")
    with pytest.raises(pickle.UnpicklingError, match="global 'collections/Counter' is forbidden"):
        a1111_safe_check(tmp_path / "evil.pt")


def test_multi_vector_word_round_trips(tiny_model_dir, tmp_path):
    vectors = torch.randn(3, 32) * 0.1
    pipe = pipeline(tiny_model_dir)
    pipe.load_textual_inversion(str(save_diffusers(tmp_path / "w.safetensors", "run_w", vectors)))
    pipe.load_textual_inversion(str(save_a1111(tmp_path / "v.a1111.safetensors", "run_v", vectors, step=5)),
                                token="run_v")
    for token in ("run_w", "run_v"):
        got = torch.cat([rows(pipe, t) for t in [token, f"{token}_1", f"{token}_2"]])
        assert torch.allclose(got, vectors, atol=1e-6)
    with pytest.raises(ValueError, match=".safetensors or .pt"):
        save_a1111(tmp_path / "v.bin", "run_v", vectors)


def test_safe_token_names():
    assert safe_token_name("default", "*s") == "default_shape"
    assert safe_token_name("default", "shape") == "default_shape"
    assert safe_token_name("default", "*t") == "default_style"
    assert safe_token_name("my run/2 (ü)", "pose") == "my_run_2_pose"
    assert safe_token_name("..hidden", "appearance") == "hidden_appearance"
    assert safe_token_name("v1.5-a", "pose") == "v1.5-a_pose"
    for name in (safe_token_name("a b:c*d?e", "*p"), safe_token_name("", "shape")):
        assert name and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name), name


def test_manifest(exported, run):
    manifest, data = exported
    assert manifest == run / "export" / "chair_001+az30_el10" / "manifest.json"     # per source set
    assert data["base_model"]["name"] == "tiny" and data["base_model"]["path"]
    assert data["run"]["name"] == "exp" and data["run"]["trained"] == ["shape", "pose"]
    assert data["run"]["checkpoint_step"] == 2 and data["seeds"]["train"] == 0
    assert [e["concept"] for e in data["tokens"]] == ["shape", "pose"]
    for e in data["tokens"]:
        assert e["token"] == f"exp_{e['concept']}" and e["run"] == "exp" and e["checkpoint_step"] == 2
        assert e["num_vectors"] == 1 and e["dim"] == 32 and e["seed"] == 0 and e["diversity"] == 0
        assert e["files"]["diffusers"] == f"{e['token']}.safetensors"
        assert e["files"]["a1111"] == f"{e['token']}.a1111.safetensors"
        for name in e["files"].values():
            assert (manifest.parent / name).is_file()
    shape, pose = entry(data, "shape"), entry(data, "pose")
    assert shape["placeholder"] == "*s" and pose["placeholder"] == "*p"
    assert shape["source"]["type"] == "object" and shape["source"]["object"] == "chair_001" and shape["source"]["view"] == 0
    assert pose["source"] == {"type": "camera", "azimuth": 30.0, "elevation": 10.0,
                              "distance": pytest.approx(pose["source"]["distance"])}
    assert pose["source"]["distance"] > 0
    assert not list(manifest.parent.glob(".*"))                   # no temp files left behind


def test_cli(run, chairs_dir, tmp_path, capsys):
    out = export.main(["--run", str(run), "--pose-from", str(chairs_dir / "chair_002"), "--view", "1",
                       "--out", str(tmp_path / "cli")])
    data = json.loads(out.read_text())
    assert [e["concept"] for e in data["tokens"]] == ["pose"]
    assert data["tokens"][0]["source"]["object"] == "chair_002" and data["tokens"][0]["source"]["view"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["exp_pose.a1111.safetensors", "exp_pose.safetensors",
                                                            "manifest.json"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--appearance-from", "{chair}"], r"did not train 'appearance' \(trained: shape, pose\)"),
    ([], "nothing to export.*--shape-from, --pose, --pose-from, --appearance-from, --style-from"),
    (["--pose", "yaw=3"], "error: --pose 'yaw=3': expected azimuth=A"),
    (["--pose", "elevation=3"], "azimuth is required"),
    (["--pose", "azimuth=3", "--pose-from", "{chair}"], "either --pose or --pose-from"),
    (["--shape-from", "{missing}"], "error: "),
    (["--shape-from", "{chair}", "--view", "99"], "view 99 out of range"),
    (["--shape-from", "{chair}", "--checkpoint", "{missing}"], "not a checkpoint folder"),
])
def test_cli_errors(run, chairs_dir, tmp_path, extra, message):
    values = {"chair": str(chairs_dir / "chair_001"), "missing": str(tmp_path / "nope")}
    extra = [a.format(**values) for a in extra]
    with pytest.raises(SystemExit, match=message):
        export.main(["--run", str(run), "--out", str(tmp_path / "o"), *extra])
    assert not (tmp_path / "o").exists()                           # nothing written on an error


def test_bad_run_folder_and_function_errors(run, tmp_path):
    with pytest.raises(SystemExit, match="error: .*not a run folder"):
        export.main(["--run", str(tmp_path), "--pose", "azimuth=3"])
    with pytest.raises(ValueError, match="nothing to export"):
        export.export_tokens(run, {})
    with pytest.raises(ValueError, match="unknown concept 'colour'"):
        export.export_tokens(run, {"colour": tmp_path})
    with pytest.raises(ValueError, match="only for the pose"):
        export.export_tokens(run, {"shape": POSE})


def test_exported_files_are_readable_by_others(exported):
    manifest, _ = exported
    umask = os.umask(0)
    os.umask(umask)
    for path in manifest.parent.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
