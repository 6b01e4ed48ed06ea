"""``dreamguide ui`` in a real browser: Debian's Chromium, headless, driven by Playwright, on the toy world.

The app runs as the command a user starts (``python -m dreamguide ui --port P``) on a free local
port. The tests click through: pick a subject -> sample -> the grid shows the modes -> download an
image whose PNG metadata holds the settings; bad input on both forms shows the command line's
message next to its field and the app keeps working; a training run is cancelled, resumed and
offers its adapter for download. Screenshots go to the test's temporary folder.

Skipped, with the reason, when Playwright, Gradio or Chromium is missing, unless
``DREAMGUIDE_REQUIRE_BROWSER`` is set (CI), where that is a failure. ``DREAMGUIDE_CHROMIUM``
names the browser executable (default: ``chromium`` on the PATH).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dreamguide.toyworld.model import BUNDLED_MODEL_DIR

CHROMIUM = os.environ.get("DREAMGUIDE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
#: Chromium without anything that reaches out: no GPU, QUIC, first-run, sync or component updates.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = bool(os.environ.get("DREAMGUIDE_REQUIRE_BROWSER"))
TIMEOUT_MS = 240_000


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if importlib.util.find_spec("gradio") is None:
        return "Gradio is not installed (pip install -e '.[ui]')"
    if not CHROMIUM:
        return "Chromium is not installed (apt-get install chromium, or set DREAMGUIDE_CHROMIUM)"
    if not (BUNDLED_MODEL_DIR / "model_index.json").exists():
        return "bundled toy-world weights not built"
    return None


MISSING = _missing()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"browser tests: {MISSING}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """``dreamguide ui`` on the toy world, serving on a free local port: (url, output folder)."""
    if MISSING:
        pytest.fail(f"DREAMGUIDE_REQUIRE_BROWSER is set but {MISSING}")
    root = tmp_path_factory.mktemp("ui-app")
    port = _free_port()
    log = open(root / "app.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dreamguide", "ui", "--port", str(port), "--output", str(root / "output")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"dreamguide ui exited with {process.returncode}:\n{(root / 'app.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"dreamguide ui did not answer on {url} within 180 s:\n{(root / 'app.log').read_text()}")
        time.sleep(0.5)
    yield url, root / "output"
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser_context(app, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(app, browser_context):
    url, _ = app
    page = browser_context.new_page()
    page.goto(url)
    page.locator("#dg-subject").wait_for()
    yield page
    page.close()


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def cli_message(args: list[str]) -> str:
    """What ``dreamguide ARGS`` prints after ``error:``."""
    import contextlib
    import io

    from dreamguide.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == 2
    return err.getvalue().strip().split("error: ", 1)[1]


def wait_for_grid(page) -> None:
    page.locator('#dg-grid .dg-grid[data-done="1"]').wait_for()


def test_pick_subject_sample_and_download_an_image_with_its_settings(page, tmp_path):
    from dreamguide.images import read_png_metadata

    page.screenshot(path=tmp_path / "1-personalize.png", full_page=True)
    choose(page, "dg-subject-choice", "zwx cup")  # no bundled adapter: nothing to use, train it instead
    page.wait_for_function("!document.querySelector('#dg-use-subject').matches(':enabled')")
    choose(page, "dg-subject-choice", "sks ball")
    page.wait_for_function("document.querySelector('#dg-use-subject').matches(':enabled')")
    page.locator("#dg-use-subject").click()
    page.locator("#dg-subject").get_by_text("sks ball (bundled dreambooth adapter)").wait_for()
    page.locator("#dg-sample").wait_for(state="visible")  # the page moved to Sample & compare
    prompt = page.locator("#dg-prompt textarea, #dg-prompt input").first
    assert "sks ball" in prompt.input_value()
    fill(page, "dg-prompt", "a pencil sketch of a sks ball")
    fill(page, "dg-seeds", "0,1")
    fill(page, "dg-steps", "3")
    page.locator("#dg-sample").click()
    wait_for_grid(page)
    page.screenshot(path=tmp_path / "2-compare.png", full_page=True)

    grid = page.locator("#dg-grid")
    assert grid.locator("thead th[data-mode]").evaluate_all("cells => cells.map(c => c.dataset.mode)") == [
        "cfg", "dreambooth", "consistency", "parallel-rescaled"]
    assert grid.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.seed)") == ["0", "1"]
    widths = grid.locator("img").evaluate_all("images => images.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths == [32] * 8  # every image loaded
    assert grid.locator(".dg-score").count() == 8
    assert page.locator("#dg-summary tr[data-mode]").count() == 4
    page.locator("#dg-consistency-plot img").wait_for()
    page.locator("#dg-tradeoff-plot img").wait_for()

    link = grid.locator('td[data-mode="parallel-rescaled"][data-seed="1"] a.dg-download')
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "parallel-rescaled-seed1.png"
    metadata = read_png_metadata(saved)
    assert metadata["prompt"] == "a pencil sketch of a sks ball"
    assert metadata["base_prompt"] == "a pencil sketch of a ball"
    assert (metadata["mode"], metadata["seed"], metadata["steps"]) == ("parallel-rescaled", 1, 3)
    assert (metadata["w_text"], metadata["w_cons"], metadata["token"]) == (7.5, 3.0, "sks")
    assert metadata["pr"]["normalization"] == "standardize" and metadata["lora"].endswith(".safetensors")


def test_bad_sample_settings_show_the_command_lines_message_next_to_the_field(page, tmp_path):
    page.get_by_role("tab", name="Sample & compare").click()
    fill(page, "dg-prompt", "a pencil sketch of a ball")
    fill(page, "dg-w-cons", "nan")
    fill(page, "dg-steps", "2")
    page.locator("#dg-sample").click()
    token_message = cli_message(["sample", "--model", "never-loaded", "--token", "sks", "--class-word", "ball",
                                 "--prompt", "a pencil sketch of a ball"])
    nan_message = cli_message(["sample", "--model", "never-loaded", "--token", "sks", "--class-word", "ball",
                               "--prompt", "a sks ball", "--w-cons", "nan"])
    page.locator("#dg-error-prompt .dg-error").wait_for()
    assert page.locator("#dg-error-prompt .dg-error").inner_text() == token_message
    assert page.locator("#dg-error-w_cons .dg-error").inner_text() == nan_message
    page.screenshot(path=tmp_path / "3-bad-input.png", full_page=True)
    # The app keeps running: fixed values sample, and the messages go away.
    fill(page, "dg-prompt", "a sks ball in the snow")
    fill(page, "dg-w-cons", "3")
    fill(page, "dg-seeds", "4")
    page.locator("#dg-sample").click()
    page.locator('#dg-grid tr[data-seed="4"]').wait_for()
    wait_for_grid(page)
    assert page.locator(".dg-error").count() == 0


def test_bad_photos_show_the_trainers_message_next_to_the_field(page, tmp_path):
    choose(page, "dg-subject-choice", "my photos")
    page.locator("#dg-photos").wait_for(state="visible")
    fill(page, "dg-class-word", "ball")
    page.locator("#dg-train-start").click()
    box = page.locator("#dg-error-photos .dg-error")
    box.wait_for()
    assert "has no images" in box.inner_text() and "data.instance_dir" in box.inner_text()
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"not an image at all")
    page.locator("#dg-photos input[type=file]").set_input_files(str(corrupt))
    page.locator("#dg-photos").get_by_text("photo", exact=False).first.wait_for()
    page.locator("#dg-train-start").click()
    page.wait_for_function(
        "document.querySelector('#dg-error-photos .dg-error')?.innerText.startsWith('cannot read image')")
    assert "replace or delete the file" in box.inner_text()
    page.screenshot(path=tmp_path / "4-bad-photos.png", full_page=True)
    assert page.locator("#dg-train-progress .dg-progress").get_attribute("data-status") == "none"


def test_training_is_cancelled_resumed_and_offers_its_adapter(page, app, tmp_path):
    from safetensors.torch import load_file

    choose(page, "dg-subject-choice", "qlo house")
    for elem_id, value in (("dg-train-steps", "20"), ("dg-batch-size", "1"), ("dg-rank", "4"),
                           ("dg-sample-every", "0")):
        fill(page, elem_id, value)
    page.locator("#dg-train-start").click()
    page.locator('#dg-train-progress .dg-progress[data-status="running"]').wait_for()
    page.wait_for_function("Number(document.querySelector('#dg-train-progress .dg-progress').dataset.step) >= 1")
    page.locator("#dg-train-cancel").click()
    page.locator('#dg-train-progress .dg-progress[data-status="stopped"]').wait_for()
    stopped_at = int(page.locator("#dg-train-progress .dg-progress").get_attribute("data-step"))
    assert 1 <= stopped_at < 20
    page.locator("#dg-train-resume").click()
    page.locator('#dg-train-progress .dg-progress[data-status="done"]').wait_for()
    page.locator("#dg-subject").get_by_text("qlo house (dreambooth, trained here)").wait_for()
    page.screenshot(path=tmp_path / "5-trained.png", full_page=True)
    links = page.locator("#dg-adapter-files a[download]")
    names = links.evaluate_all("links => links.map(a => a.getAttribute('download'))")
    assert "pytorch_lora_weights.safetensors" in names and "config.toml" in names
    with page.expect_download() as download:
        links.nth(names.index("pytorch_lora_weights.safetensors")).click()
    saved = tmp_path / "lora.safetensors"
    download.value.save_as(saved)
    assert any(key.endswith("lora_A.weight") for key in load_file(str(saved)))
    _, output = app
    (run,) = [p for p in (output / "runs").iterdir() if "qlo" in p.name]
    logged = [json.loads(line)["step"] for line in (run / "adapter" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 21))  # the resumed run continued where the cancelled one stopped
