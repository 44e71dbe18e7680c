"""The web app in a real browser: headless Debian chromium, driven by playwright.

Opens the page, types a prompt, clicks Generate, waits for the image and the stats, and saves a
screenshot (to $ACCEL_SCREENSHOT_DIR when set, else the test's temporary folder). Then what only a
browser shows: the history after a reload, one progress bar, Stop's message, a config error beside
its fields, and a closed tab stopping its run. Playwright drives
the system chromium through ``executable_path``; it never downloads a browser of its own. `.ci/run`
installs chromium with apt-get, so in CI this test runs; elsewhere it is skipped only when chromium
or playwright is missing, and says which.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytest.importorskip("gradio", reason="the web app needs gradio: pip install 'diffusers-accel[app]'")
if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"no chromium at {CHROMIUM}: install it with `apt-get install chromium` (.ci/run does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install 'diffusers-accel[dev]'")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_cache):
    import accel
    from accel.web.limits import Limits
    from accel.web.page import build_app, serve

    pipe = tiny_cache("sd15")
    demo = build_app(pipe, "tiny-sd15", limits=Limits(max_steps=400), out_dir=tmp_path_factory.mktemp("browser-app"))
    url = serve(demo, port=None, block=False, quiet=True)
    yield url, demo.accel_engine
    demo.close()
    accel.remove(pipe)  # the session's shared pipeline goes back as it came


def _screenshot(page, tmp_path, name):
    folder = Path(os.environ.get("ACCEL_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
            args=FLAGS, viewport={"width": 1400, "height": 1500})
        context.set_default_timeout(90_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_generate_in_a_real_browser(app_url, page, tmp_path):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url[0])
    from accel.web.examples import example_prompts

    # the placeholder reads as a hint quoting an example; the example prompts are in the words the tiny model knows
    examples = example_prompts("tiny-sd15", False)
    hint = page.locator("#prompt textarea").get_attribute("placeholder")
    assert hint.startswith("Type a prompt") and examples[0] in hint
    page.get_by_text(examples[1], exact=True).click()  # an example fills the prompt
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {examples[1]!r}")
    page.locator("#prompt textarea").fill("a photo of a red cat")
    page.locator("#steps input").fill("2")
    page.locator("#generate").click()

    image = page.locator("#result img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#result img') && document.querySelector('#result img').complete"
                           " && document.querySelector('#result img').naturalWidth > 0")
    stats = page.locator("#stats")
    stats.get_by_text("applied").first.wait_for()
    page.locator("#summary").get_by_text("2 steps").wait_for()
    assert page.evaluate("document.querySelector('#result img').naturalWidth") == 32
    history = page.locator("#history img")
    history.first.wait_for(state="visible")

    _screenshot(page, tmp_path, "web_app_generate.png")
    page.reload()  # a new page load reads the history back from the output folder
    page.locator("#history img").first.wait_for(state="visible")
    assert not errors, errors


def test_stop_button_ends_a_long_run(app_url, page):
    engine = app_url[1]
    page.locator("#prompt textarea").fill("a long run")  # the page was reloaded: the prompt is empty
    page.locator("#steps input").fill("300")
    page.locator("#generate").click()
    page.get_by_text("accelerated: denoising").first.wait_for()  # the progress bar is running
    page.wait_for_function("/([3-9]|[1-9][0-9]+)\\/300/.test(document.body.innerText)")  # a few steps done
    # one progress bar, on the accelerated output; Seed and the other outputs show none
    assert page.get_by_text("accelerated: denoising").count() == 1
    assert page.locator("#result").get_by_text("accelerated: denoising").count() == 1
    page.locator("#stop").click()
    stopped = page.locator("#summary").get_by_text("Stopped after")
    stopped.wait_for()  # the page says how far the run got, and shows no error badges
    assert re.search(r"Stopped after \d+ of 300 steps", stopped.inner_text())
    assert page.get_by_text("Error", exact=True).count() == 0
    page.locator("#steps input").fill("1")
    page.locator("#generate").click()
    page.locator("#summary").get_by_text("1 step,").wait_for()  # the next request ran
    long_runs = [e for e in engine.log if e["steps"] == 300]
    assert long_runs and long_runs[-1]["stopped"] and long_runs[-1]["steps_done"] < 300


def test_closing_the_tab_stops_its_run(app_url, page):
    engine = app_url[1]
    out = engine.out_dir
    before = set(out.glob("*.png"))
    tab = page.context.new_page()
    tab.goto(app_url[0])
    tab.locator("#prompt textarea").fill("a run in a tab that closes")
    tab.locator("#steps input").fill("400")
    tab.locator("#generate").click()
    tab.wait_for_function("/([3-9]|[1-9][0-9]+)\\/400/.test(document.body.innerText)")  # a few steps done
    tab.close()
    page.locator("#steps input").fill("1")
    page.locator("#prompt textarea").fill("after the tab closed")
    page.locator("#seed input").fill("77")
    page.locator("#generate").click()
    page.locator("#summary").get_by_text("seed 77)").wait_for()  # the only worker was freed
    closed = [e for e in engine.log if e["steps"] == 400]
    assert closed and closed[-1]["stopped"] and closed[-1]["steps_done"] < 400
    assert len(set(out.glob("*.png")) - before) == 1  # the closed tab's run wrote nothing


def test_config_error_shows_beside_its_fields(app_url, page):
    import accel
    from accel.web.controls import section_title

    page.get_by_text(section_title(accel.CacheConfig)).click()  # open the cache knobs
    interval = page.locator("#knob-cache-interval input")
    old = interval.input_value()
    interval.fill("0")
    interval.press("Tab")
    # right under the field, inside its section
    error = page.locator("#section-cache #config_error-cache-interval")
    error.get_by_text("cache.interval: 0 is out of range").wait_for()
    box, field = error.bounding_box(), interval.bounding_box()
    assert 0 <= box["y"] - (field["y"] + field["height"]) < 150, (box, field)
    assert page.locator("#config_error").inner_text().strip() == ""
    page.get_by_text("Config: the last valid one").wait_for()  # the JSON says it is not what the controls show
    interval.fill(old)
    interval.press("Tab")
    error.wait_for(state="hidden")
    page.get_by_text("Config (sidecar-compatible").wait_for()
    page.get_by_text(section_title(accel.CacheConfig)).click()  # closed again, as the next test expects


def test_preset_fills_the_knobs_and_compare_shows_both(app_url, page, tmp_path):
    import accel

    enabled = [p for p in accel.available_presets() if accel.preset(p, "sd15").cache.enabled]
    if not enabled:
        pytest.skip("no preset with step caching for sd15 in this tree")
    name, method = enabled[-1], accel.preset(enabled[-1], "sd15").cache.method
    page.locator("#preset input").click()
    page.get_by_role("option", name=name, exact=True).click()
    from accel.web.controls import section_title

    page.get_by_text(section_title(accel.CacheConfig)).click()  # open the cache knobs
    page.wait_for_function(f"document.querySelector('#knob-cache-method input')?.value === {method!r}")
    page.get_by_text(f'"method": "{method}"').first.wait_for()  # the config JSON follows the knobs
    page.locator("#steps input").fill("6")
    page.locator("#compare").click()
    page.locator("#summary").get_by_text("speedup").wait_for()
    page.locator("#baseline img").first.wait_for(state="visible")
    page.locator("#result img").first.wait_for(state="visible")
    text = page.locator("#summary").inner_text()
    assert "SSIM" in text and "step cache reused" in text and re.search(r"baseline [\d.]+ s \([\d.]+-[\d.]+ s\)", text)
    _screenshot(page, tmp_path, "web_app_compare.png")

pytestmark = [pytest.mark.browser, pytest.mark.slow]
