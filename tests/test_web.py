"""The browser front end of play.py: a real server process, a real headless Chromium, and the JSON protocol."""
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"


# What evaluate.py genie might have measured: labels for the page, and the keys' defaults they imply.
MEANING = [{"action": 0, "effect": "left", "share": 0.6, "count": 50}, {"action": 1, "effect": "right + jump",
           "share": 0.71, "count": 40}, {"action": 2, "effect": "right", "share": 0.5, "count": 60},
           {"action": 3, "effect": "jump", "share": 0.4, "count": 30}, {"action": 4, "effect": "right", "share": 0.3,
           "count": 20}, {"action": 5, "effect": "none", "share": 0.8, "count": 90},
           {"action": 6, "effect": "left + jump", "share": 0.5, "count": 10}, {"action": 7, "effect": "unused",
           "share": 0.0, "count": 0}]


@pytest.fixture(scope="module", params=["genie", "diffusion"])
def server(request, tmp_path_factory):
    """play.py --ui web on a free port, serving a world labelled with MEANING: the tiny Genie models of the `genie`
    fixture, or the tiny diffusion world of `steerable_world` (2 Euler steps per frame)."""
    models = tmp_path_factory.mktemp("labelled")
    if request.param == "genie":
        genie = request.getfixturevalue("genie")
        parts, data, options = genie / "models", genie / "coinrun", []
    else:
        parts, data = request.getfixturevalue("steerable_world"), request.getfixturevalue("diffusion_data")["store"]
        options = ["--steps", "2"]
    for part in parts.iterdir():
        if part.name in ("tokenizer", "lam", "dynamics", "vae2", "dit"):
            shutil.copytree(part, models / part.name)
    (models / "meaning.json").write_text(json.dumps({"meaning": MEANING}))
    process = subprocess.Popen([sys.executable, "play.py", "--models", str(models), "--data",
                                str(data), "--port", "0", "--no_browser", *options], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("play page: http://localhost:"), line + process.stderr.read()
    assert "ssh -N -L" in process.stdout.readline()
    yield line.split()[-1].rstrip("/")
    process.terminate()
    process.wait(timeout=30)


def request(url, path, body=None, headers=None):
    """POST JSON (or GET without a body); returns (status, decoded JSON or raw bytes)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, content = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, content = e.code, e.read()
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content


def test_bad_requests_get_4xx_and_leave_the_session_alone(server):
    status, session = request(server, "/api/session", {})
    assert status == 200 and session["step"] == 0 and session["num_actions"] == 8
    assert session["labels"][1] == "1: right + jump (71%)" and session["labels"][7] == "7: unused (0%)"
    assert session["keymap"] == {"ArrowLeft": 0, "ArrowRight": 2, "ArrowUp": 3, " ": 3, "ArrowDown": 5}
    sid = session["session"]
    for body in ({"session": sid, "action": 8}, {"session": sid, "action": -1}, {"session": sid, "action": "3"},
                 {"session": sid, "action": True}, {"session": sid}):
        status, reply = request(server, "/api/step", body)
        assert status == 400 and "unknown action" in reply["error"], (body, reply)
    status, reply = request(server, "/api/step", b"{not json")
    assert status == 400 and "JSON object" in reply["error"]
    status, reply = request(server, "/api/step", {"session": "nope", "action": 1})
    assert status == 404 and "unknown or expired session" in reply["error"]
    status, reply = request(server, "/api/step", {"session": sid, "action": 1})
    assert status == 200 and reply["step"] == 1  # the bad requests did not count or break anything


def test_foreign_origin_and_host_are_refused(server):
    port = server.rsplit(":", 1)[1]
    status, reply = request(server, "/api/session", {}, {"Origin": "http://evil.example"})
    assert status == 403 and "foreign origin" in reply["error"]
    status, _ = request(server, "/", headers={"Host": f"evil.example:{port}"})  # DNS rebinding
    assert status == 403
    status, _ = request(server, "/api/session", {}, {"Origin": f"http://localhost:{port}"})
    assert status == 200


def test_two_sessions_do_not_interfere(server):
    a = request(server, "/api/session", {})[1]["session"]
    b = request(server, "/api/session", {})[1]["session"]
    for _ in range(3):
        request(server, "/api/step", {"session": a, "action": 2})
    assert request(server, "/api/step", {"session": b, "action": 5})[1]["step"] == 1
    assert request(server, "/api/undo", {"session": a})[1]["step"] == 2
    assert request(server, "/api/step", {"session": b, "action": 5})[1]["step"] == 2
    status, gif = request(server, f"/api/download?session={a}&format=gif")
    assert status == 200 and gif[:4] == b"GIF8"


def test_play_in_a_real_browser(server, request, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package when run as root")
        pytest.skip(f"needs Debian's chromium package ({CHROMIUM}): run `make test` as root or apt-get install chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(accept_downloads=True)
        page.goto(server + "/")
        page.wait_for_function("document.querySelectorAll('#actions button').length === 8")
        assert page.text_content("#actions button[data-action='1']") == "1: right + jump (71%)"
        canvas = "document.getElementById('screen').toDataURL()"
        width = 64 if request.node.callspec.params["server"] == "genie" else 320  # the world's own frames
        page.wait_for_function(f"document.getElementById('screen').width === {width}")
        shown = page.evaluate("(({width, height}) => [width, height])"
                              "(document.getElementById('screen').getBoundingClientRect())")
        assert abs(shown[1] / shown[0] - (1 if width == 64 else 180 / 320)) < 0.02, shown  # not stretched
        first = page.evaluate(canvas)

        page.keyboard.press("3")
        page.wait_for_function("document.getElementById('step').textContent === '1'")
        page.wait_for_function(f"{canvas} !== {json.dumps(first)}")
        assert page.input_value("select[data-key='ArrowRight']") == "2"  # the action that most often went right
        page.keyboard.press("ArrowRight")
        page.wait_for_function("document.getElementById('step').textContent === '2'")
        page.click("#actions button[data-action='7']")
        page.wait_for_function("document.getElementById('step').textContent === '3'")
        assert float(page.text_content("#fps")) > 0
        page.keyboard.press("u")
        page.wait_for_function("document.getElementById('step').textContent === '2'")

        with page.expect_download() as download:
            page.click("#gif")
        assert Path(download.value.path()).read_bytes()[:4] == b"GIF8"
        with page.expect_download() as download:
            page.click("#mp4")
        assert Path(download.value.path()).read_bytes()[4:8] == b"ftyp"

        page.select_option("select[data-key='ArrowLeft']", "6")  # remembered in the browser across reloads
        (ROOT / "results").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "results" / f"play_web_{request.node.callspec.params['server']}.png"))
        page.reload()
        page.wait_for_function("document.querySelectorAll('#actions button').length === 8")
        assert page.input_value("select[data-key='ArrowLeft']") == "6"
        page.click("#keymap-reset")  # back to the keys the labels give
        assert page.input_value("select[data-key='ArrowLeft']") == "0"
        page.keyboard.press("r")
        page.wait_for_function("document.getElementById('step').textContent === '0'")
        assert page.text_content("#error") == ""
        browser.close()


def test_the_true_action_world_plays_with_the_arrow_keys(true_genie, genie, tmp_path):
    """A Genie world trained on CoinRun's own actions: the page labels its 15 actions with their names and binds the
    arrows to LEFT, RIGHT, UP (jump) and NOOP, with no evaluation needed."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium package ({CHROMIUM})")
    process = subprocess.Popen([sys.executable, "play.py", "--models", str(true_genie), "--data",
                                str(genie / "coinrun"), "--port", "0", "--no_browser"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().split()[-1].rstrip("/")
        status, session = request(url, "/api/session", {})
        assert status == 200 and session["num_actions"] == 15
        assert session["labels"][7] == "7: RIGHT" and session["labels"][2] == "2: LEFT+UP"
        assert session["keymap"] == {"ArrowLeft": 1, "ArrowRight": 7, "ArrowUp": 5, " ": 5, "ArrowDown": 4}
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#actions button').length === 15")
            assert page.text_content("#actions button[data-action='7']") == "7: RIGHT"
            assert "the game's own actions" in page.text_content("#actions-hint")
            assert page.input_value("select[data-key='ArrowRight']") == "7"
            for step, key in enumerate(("ArrowRight", "ArrowRight", "ArrowUp", "ArrowLeft"), 1):
                page.keyboard.press(key)
                page.wait_for_function(f"document.getElementById('step').textContent === '{step}'")
            page.keyboard.press("u")
            page.wait_for_function("document.getElementById('step').textContent === '3'")
            (ROOT / "results").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "results" / "play_web_true_actions.png"))
            assert page.text_content("#error") == ""
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
