"""The mixer: each word from its own object, the pose from sliders, in a browser.

    pip install -e ".[demo]"
    python demo.py --run runs/default            # http://127.0.0.1:7860

For each trained word, pick the object it is encoded from (the run's data, or an object folder
uploaded as a .zip); a camera-reading pose word can take sliders instead. Generate samples the
prompt exactly as `generate.generate` does (same seeds, same pixels) and shows the samples and
each word's attention, as PNG. Bad input gets generate.py's one-line error in the page. Gradio
is imported lazily, listens on 127.0.0.1, and makes no analytics or version calls.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guided_concepts.argtypes import device as device_type
from guided_concepts.configs.schema import ConfigError
from guided_concepts.generate import generate, load_run
from guided_concepts.objectdata import DataError, scan_objects
from guided_concepts.overlays import attention_grid
from guided_concepts.rundata import resolve_data_root
from guided_concepts.tokens import TokenError

SLIDERS = "pose sliders"            # the pose word's source when its camera comes from the sliders
ERRORS = (ConfigError, DataError, TokenError, ValueError, OSError)


def to_png(image: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> an 8-bit RGB image (what the page shows and the test compares)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


class Mixer:
    """The page's state: the run, its objects, and one generate() call per click."""

    def __init__(self, run: str | Path, device: str = "cpu"):
        self.system, self.cfg = load_run(run, device=device)
        self.words = list(self.system.tokens)
        self.tokens = {n: self.system.heads[n].config.token for n in self.words}
        root = resolve_data_root(self.cfg.data.root)
        self.objects = {r.name: r.root for r in scan_objects(root, require_masks=False)}
        self.uploads = Path(tempfile.mkdtemp(prefix="mixer-uploads-"))
        self.camera_word = next((n for n in self.words if "camera" in getattr(self.cfg.concepts[n], "inputs", ())), None)

    def choices(self) -> list[str]:
        return sorted(self.objects)

    def default_prompt(self) -> str:
        return self.default_prompt_for(self.tokens)

    @staticmethod
    def default_prompt_for(tokens: dict[str, str]) -> str:
        return "a chair, " + ", ".join(f"{n} {t}" for n, t in tokens.items())

    def upload(self, path: str) -> str:
        """An object folder in a .zip -> its name, added to every word's choices (a later upload
        of the same name replaces it in the list; each is extracted into its own folder)."""
        name = Path(path).stem
        target = Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads))
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target)
        except zipfile.BadZipFile:
            raise ValueError(f"{Path(path).name}: not a zip file") from None
        folders = sorted({p.parent for p in target.rglob("views") if p.is_dir()})
        if len(folders) != 1:
            raise ValueError(f"{Path(path).name}: expected one object folder (with views/), found {len(folders)}")
        scan_objects(folders[0], require_masks=False)           # checked like training data
        self.objects[f"upload: {name}"] = folders[0]
        return f"upload: {name}"

    def sources(self, picks: dict[str, str], camera: tuple[float, float, float]) -> dict:
        out = {}
        for name, pick in picks.items():
            if pick == SLIDERS and name == self.camera_word:
                out[name] = {"azimuth": camera[0], "elevation": camera[1], "distance": camera[2]}
            elif pick:
                if pick not in self.objects:
                    raise ValueError(f"{name}: no object {pick!r} (choose one from the list)")
                out[name] = str(self.objects[pick])
        return out

    def run(self, prompt: str, picks: dict[str, str], camera, diversity: float, seed: int, steps: int,
            guidance: float, num: int):
        """-> (samples as PNG images, the attention grid, status line)."""
        for label, value in (("seed", seed), ("steps", steps), ("samples", num)):
            if value is None or float(value) != int(value):
                raise ValueError(f"{label}: give a whole number, got {value!r}")
        reference, images, maps = generate(self.system, self.cfg, prompt, self.sources(picks, camera), num=int(num),
                                   seed=int(seed), steps=int(steps), guidance_scale=float(guidance),
                                   diversity=float(diversity))
        names = [self.tokens[n] for n in self.system.attention_concepts]
        grid = attention_grid(reference[None].repeat(len(images), 1, 1, 1), images, maps, names)
        return [to_png(image) for image in images], grid, f"{len(images)} sample(s), seed {int(seed)}"


def build_page(mixer: Mixer):
    import gradio as gr
    with gr.Blocks(title="guided-concepts mixer", analytics_enabled=False) as page:
        gr.Markdown("Each word from its own object; the pose from the sliders. " +
                    ", ".join(f"`{t}` = {n}" for n, t in mixer.tokens.items()))
        prompt = gr.Textbox(mixer.default_prompt(), label="prompt", elem_id="prompt")
        upload = gr.UploadButton("add an object folder (.zip of views/, masks/, meta.json)", file_types=[".zip"],
                                 elem_id="upload", size="sm")
        picks = {}
        with gr.Row():
            for name in mixer.words:
                options = mixer.choices() + ([SLIDERS] if name == mixer.camera_word else [])
                default = SLIDERS if name == mixer.camera_word else options[0]
                picks[name] = gr.Dropdown(options, value=default, label=f"{mixer.tokens[name]} ({name}) from",
                                          elem_id=f"{name}-from")
        with gr.Row():
            azimuth = gr.Slider(-180, 180, value=30, step=1, label="azimuth", elem_id="azimuth")
            elevation = gr.Slider(-10, 60, value=15, step=1, label="elevation", elem_id="elevation")
            distance = gr.Slider(1.5, 4.0, value=2.5, step=0.05, label="distance", elem_id="distance")
        with gr.Row():
            diversity = gr.Slider(0, 2, value=0, step=0.05, label="diversity (tau)", elem_id="diversity")
            seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
            steps = gr.Slider(1, 50, value=20, step=1, label="steps", elem_id="steps")
            guidance = gr.Slider(1, 10, value=5, step=0.5, label="guidance", elem_id="guidance")
            num = gr.Slider(1, 8, value=2, step=1, label="samples", elem_id="num")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            samples = gr.Gallery(label="samples", format="png", columns=4, rows=1, object_fit="contain",
                                 preview=False, allow_preview=False, elem_id="samples")
            overlay = gr.Image(label="reference | sample | attention of each word", format="png", type="pil",
                               height=300, elem_id="attention")

        names = list(picks)

        def on_generate(prompt_text, *values):
            chosen = dict(zip(names, values[:len(names)]))
            az, el, dist, tau, seed_value, step_count, scale, count = values[len(names):]
            try:
                images, grid, line = mixer.run(prompt_text, chosen, (az, el, dist), tau, seed_value, step_count,
                                               scale, count)
            except ERRORS as error:
                return [], None, f"**error:** {error}"
            return images, grid, line

        def on_upload(path):
            if path is None:
                return [gr.update() for _ in names] + [""]
            try:
                name = mixer.upload(path)
            except ERRORS as error:
                return [gr.update() for _ in names] + [f"**error:** {error}"]
            updates = [gr.update(choices=mixer.choices() + ([SLIDERS] if n == mixer.camera_word else []))
                       for n in names]
            return updates + [f"added {name}"]

        inputs = [prompt, *picks.values(), azimuth, elevation, distance, diversity, seed, steps, guidance, num]
        button.click(on_generate, inputs, [samples, overlay, status], api_name="generate")
        upload.upload(on_upload, upload, [*picks.values(), status], api_name="upload")
    return page


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (runs/<name>)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")      # offline: no analytics, no version call
    if importlib.util.find_spec("gradio") is None:
        sys.exit('error: the mixer needs Gradio: pip install -e ".[demo]"')
    try:
        mixer = Mixer(args.run, args.device)
    except ERRORS as error:
        sys.exit(f"error: {error}")
    page = build_page(mixer)
    launch(page, args.host, args.port)


def launch(page, host: str, port: int, block: bool = True):
    """System fonts (the default theme fetches Google's), no share link, no server-side SSR."""
    import gradio as gr
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    css = "#samples img, #attention img { image-rendering: pixelated; }"     # small samples, no blur
    return page.launch(server_name=host, server_port=port, share=False, show_error=False, theme=theme, css=css,
                       ssr_mode=False, prevent_thread_lock=not block)


if __name__ == "__main__":
    main()
