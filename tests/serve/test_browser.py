"""The web UI in a real browser (Chromium through Playwright): token prompt, plan, progress, video."""

import os
from pathlib import Path

import pytest

from tests.serve.conftest import TOKEN

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# Record every text the status line is given, each one, even several set in one task (the
# server sends steps that ran between two polls together, and the observer runs once for them).
WATCH_STATUS = """
window.statusLog = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (!(r.target.id === "status" || (r.target.parentNode && r.target.parentNode.id === "status")))
      continue;
    if (r.type === "characterData") window.statusLog.push(r.target.data);
    for (const n of r.addedNodes) window.statusLog.push(n.textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_ui_runs_a_job_and_plays_the_video(browser, token_server, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept(TOKEN)))
    page.add_init_script(WATCH_STATUS)
    page.goto(token_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#plan-timeline .step').length > 0")
    assert len(dialogs) == 1 and "token" in dialogs[0]  # asked once, although several calls got 401

    page.fill("#prompt", "a red square moving right")
    for field, value in (
        ("#width", "64"),
        ("#height", "64"),
        ("#num_frames", "17"),
        ("#num_steps", "30"),
    ):
        page.fill(field, value)
    page.wait_for_function("document.querySelectorAll('#plan-timeline .step').length === 30")
    experts = page.eval_on_selector_all(
        "#plan-timeline .step", "els => els.map(e => e.dataset.experts)"
    )
    assert set(experts) <= {"high_noise", "low_noise"}
    colors = page.eval_on_selector_all(
        "#plan-timeline .step", "els => els.map(e => e.style.background)"
    )
    assert len({(e, c) for e, c in zip(experts, colors)}) == len(
        set(experts)
    )  # one colour per expert

    assert page.is_checked("#rewrite_prompt")  # on by default; off for this job
    page.uncheck("#rewrite_prompt")
    page.click("#run")
    page.wait_for_function(
        "document.getElementById('status').dataset.status === 'done'", timeout=60_000
    )
    page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=20_000)
    duration = page.evaluate("document.getElementById('video').duration")
    assert abs(duration - 17 / 16) <= 1 / 16 + 1e-3  # 17 frames at 16 fps
    log = page.evaluate("window.statusLog")
    assert any("expert at work" in t and ("high_noise" in t or "low_noise" in t) for t in log), log
    assert page.locator("#progress-timeline .step").count() == 30

    page.wait_for_selector("#gallery .card")
    page.fill("#prompt", "")
    page.locator("#gallery .card .use-settings").first.click()
    assert page.input_value("#prompt") == "a red square moving right"
    assert page.input_value("#num_steps") == "30"
    assert not page.is_checked("#rewrite_prompt")  # the job's own setting, back from the API
    page.screenshot(path=str(tmp_path / "serve_ui.png"), full_page=True)
    if os.environ.get("VIDMOE_UI_SCREENSHOT"):  # docs/serve_ui.png is made this way
        page.screenshot(path=os.environ["VIDMOE_UI_SCREENSHOT"], full_page=True)
    assert len(dialogs) == 1
    page.close()
