"""The mixer (demo.py): the real server on 127.0.0.1, driven through gradio_client (every run) and
a real Chromium with Playwright; what the page shows is pixel-identical to generate.generate."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow      # a server process and a browser: the full suite only

pytest.importorskip("gradio", reason='the mixer needs the [demo] extra: pip install -e ".[demo]"')

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = os.environ.get("MIXER_SCREENSHOT")      # where the browser test saves the page (README's picture)
RUN = os.environ.get("MIXER_RUN")                    # a run of your own to drive instead of the tiny one
STEPS = os.environ.get("MIXER_STEPS", "2")           # denoising steps of the browser test's sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mixer_run(tmp_path_factory, tiny_model_dir, chairs_dir):
    from guided_concepts import train
    from tests.test_training import args
    if RUN:
        return Path(RUN)
    out = tmp_path_factory.mktemp("mixer")
    return train.main(args(out, "mix", "--tokens", "shape,pose,appearance", "--set", "train.steps=2"))


@pytest.fixture(scope="module")
def server(mixer_run, tmp_path_factory):
    """`python demo.py --run RUN --port P` as a user starts it; stopped by its handle."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("demo") / "demo.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--run", str(mixer_run), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):                      # generous: a slow shared machine
            if process.poll() is not None:
                raise RuntimeError(f"demo.py exited: {Path(log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("demo.py did not answer in 300 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def objects(run) -> list[Path]:
    """The run's object folders, as the page lists them (sorted by name)."""
    from guided_concepts.configs.schema import load_config
    from guided_concepts.objectdata import scan_objects
    from guided_concepts.rundata import resolve_data_root
    root = resolve_data_root(load_config(Path(run) / "config.yaml").data.root)
    return sorted((r.root for r in scan_objects(root, require_masks=False)), key=lambda p: p.name)


def expected(run, shape: Path, appearance: Path, camera: tuple[float, float, float], steps: int):
    """The same mix through generate.generate in this process -> the first sample as 8-bit pixels."""
    from guided_concepts.demo import Mixer, to_png
    from guided_concepts.generate import generate, load_run
    system, cfg = load_run(run)
    sources = {"shape": str(shape), "appearance": str(appearance),
               "pose": dict(zip(("azimuth", "elevation", "distance"), camera))}
    prompt = Mixer.default_prompt_for({n: system.heads[n].config.token for n in system.tokens})
    _, images, _ = generate(system, cfg, prompt, sources, num=1, seed=0, steps=steps, guidance_scale=5.0)
    return np.asarray(to_png(images[0]))


def test_gradio_client_mix_is_pixel_identical_to_generate(server, mixer_run):
    from gradio_client import Client
    client = Client(server, verbose=False)
    found = objects(mixer_run)
    samples, attention, status = client.predict(
        "a chair, shape *s, pose *p, appearance *a", found[2].name, "pose sliders", found[7].name, 60, 20, 2.5, 0, 0, 2,
        5, 1, api_name="/generate")
    assert status == "1 sample(s), seed 0"
    got = np.asarray(Image.open(samples[0]["image"]).convert("RGB"))
    assert samples[0]["image"].endswith(".png") and attention.endswith(".png")
    assert np.array_equal(got, expected(mixer_run, found[2], found[7], (60.0, 20.0, 2.5), steps=2))
    # Bad input: generate.py's one-line error in the page, not a traceback.
    samples, attention, status = client.predict(
        "a chair, shape *s, pose *p, appearance *a, style *t", found[2].name, "pose sliders", found[7].name, 60, 20,
        2.5, 0, 0, 2, 5, 1, api_name="/generate")
    assert status.startswith("**error:**") and "*t" in status and "\n" not in status
    assert samples == [] and attention is None


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None or __import__("importlib").util.find_spec("playwright") is None:
        reason = "the browser test needs Debian's chromium and playwright (pip install -e \".[demo]\")"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI installs both")
        pytest.skip(reason)
    return path


def test_a_real_browser_mixes_words_and_sees_the_same_pixels(server, mixer_run, tmp_path):
    from playwright.sync_api import sync_playwright
    executable = chromium()
    found = objects(mixer_run)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(server)
            for element, value in (("#shape-from", found[3].name), ("#appearance-from", found[5].name)):
                field = page.locator(f"{element} input")
                field.click()
                page.locator(element).get_by_role("option", name=value, exact=True).click()
                assert field.input_value() == value
            for element, value in (("#azimuth", "75"), ("#steps", STEPS), ("#num", "1")):     # elevation stays 15
                number = page.locator(f"{element} input[type=number]")
                number.fill(value)
                number.press("Enter")
            page.locator("#generate").click()
            image = page.locator("#samples img").first
            image.wait_for(state="visible", timeout=240_000)
            assert page.locator("#status").inner_text().strip() == "1 sample(s), seed 0"
            response = page.request.get(image.get_attribute("src"))
            assert response.ok and response.headers["content-type"] == "image/png"
            got = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))
            page.screenshot(path=SCREENSHOT or str(tmp_path / "mixer.png"), full_page=True)
        finally:
            browser.close()
    assert np.array_equal(got, expected(mixer_run, found[3], found[5], (75.0, 15.0, 2.5), steps=int(STEPS)))


def test_an_uploaded_object_folder_becomes_a_source(server, mixer_run, tmp_path):
    import zipfile

    from gradio_client import Client, handle_file
    client = Client(server, verbose=False)
    source = objects(mixer_run)[4]
    archive = tmp_path / "my_chair.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in source.rglob("*"):
            handle.write(path, Path("my_chair") / path.relative_to(source))
    *choices, status = client.predict(handle_file(str(archive)), api_name="/upload")
    assert status == "added upload: my_chair"
    samples, _, status = client.predict(
        "a chair, shape *s, pose *p, appearance *a", "upload: my_chair", "pose sliders", source.name, -45, 10, 2.5, 0,
        0, 2, 5, 1, api_name="/generate")
    got = np.asarray(Image.open(samples[0]["image"]).convert("RGB"))
    assert np.array_equal(got, expected(mixer_run, source, source, (-45.0, 10.0, 2.5), steps=2))
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    *_, status = client.predict(handle_file(str(broken)), api_name="/upload")
    assert status == "**error:** broken.zip: not a zip file"
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    *_, status = client.predict(handle_file(str(empty)), api_name="/upload")
    assert status == "**error:** empty.zip: expected one object folder (with views/), found 0"
    *_, status = client.predict("a chair, shape *s", source.name, "pose sliders", source.name, 0, 10, 2.5, 0, None,
                                2, 5, 1, api_name="/generate")
    assert status == "**error:** seed: give a whole number, got None"
