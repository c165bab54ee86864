"""Looking at real runs: the HTML report in headless Chromium, TensorBoard events, live status of a running launch.

The report is opened in Debian's ``chromium`` (installed by scripts/install.sh for ``make test``) and driven
over the DevTools protocol: console errors and exceptions are collected while it loads, every <img> must
have decoded (naturalWidth > 0), a screenshot must not be blank, and every number in its tables must equal
metrics.jsonl / cross_site.json.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, hpcfl
from conftest import hold as held

pytestmark = pytest.mark.usefixtures("need_mpirun")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


# -- a small DevTools-protocol client --------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium on a fresh profile, driven over its browser websocket (flattened target sessions)."""

    def __init__(self, tmp: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            pytest.fail("chromium is not installed: run `make test` (scripts/install.sh installs it with "
                        "HPCFL_WITH_SLURM=1) or apt-get install chromium")
        websocket = pytest.importorskip("websocket", reason="websocket-client is in requirements.txt")
        self.profile = tmp / "profile"
        self.profile.mkdir()
        self.log = open(tmp / "chromium.log", "w")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port_file = self.profile / "DevToolsActivePort"
        t = time.monotonic()
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert self.proc.poll() is None, f"chromium exited: {(tmp / 'chromium.log').read_text()[-2000:]}"
            assert time.monotonic() - t < 60, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=120)
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method, session, timeout=120):
        t = time.monotonic()
        while True:
            for e in self.events:
                if e.get("method") == method and e.get("sessionId") == session:
                    return e
            assert time.monotonic() - t < timeout, f"no {method} within {timeout}s"
            self.events.append(json.loads(self.ws.recv()))

    def open(self, url, width=1280, height=2400):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=s)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=s)
        self.send("Page.navigate", {"url": url}, session=s)
        self.wait_for("Page.loadEventFired", s)
        return s

    def errors(self, session):
        """Console errors, uncaught exceptions and browser log errors (failed loads) of a page."""
        out = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def evaluate(self, session, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=session)
        assert "exceptionDetails" not in r, r
        return r["result"]["value"]

    def screenshot(self, session):
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - it may close the socket before answering
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- real runs ---------------------------------------------------------------------------------------------------------
def sets(*pairs):
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real 2-round digits run (the issue's command) and a 1-round tile run (thumbnails), with their reports."""
    tmp = tmp_path_factory.mktemp("report")
    r = hpcfl("launch", "configs/digits-2x2.yaml",
              *sets(f"run.root={tmp}", "fl.rounds=2", "fl.local_steps=4", "train.batch_size=16"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    r = hpcfl("launch", "configs/quickstart.yaml",
              *sets(f"run.root={tmp}", f"data.tiles.slides_dir={tmp}/slides", f"data.tiles.index_dir={tmp}/index",
                    "data.tiles.synthesize={slides: 4, size: 1024, seed: 0}", "fl.rounds=1", "fl.local_steps=2",
                    "data.val_fraction=0.5", "train.batch_size=16"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp / "digits-2x2", tmp / "quickstart"


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_tensorboard_events_of_a_real_run_equal_metrics_jsonl(runs):
    from reference_impl import read_scalars, rounds_scalars

    from hpcfl.observe.scalars import cross_site_scalars

    run = runs[0]
    got = read_scalars(run / "tb")
    want = {}
    for step, (series, tag, v) in rounds_scalars(metrics(run)):
        want.setdefault((series, tag), {})[step] = float(np.float32(v))
    cross = json.loads((run / "cross_site.json").read_text())
    for series, tag, v in cross_site_scalars(cross):
        want.setdefault((series, tag), {})[2] = float(np.float32(v))  # written at the last round's step
    assert got == want
    for tag in ("val_accuracy", "val_loss", "local_val_accuracy", "time/train_s", "time/round_s", "sites_done"):
        assert sorted(got[("", tag)]) == [1, 2], tag
    for site in ("hospital-a", "hospital-b"):
        for tag in ("val/global/accuracy", "val/local/accuracy", "train/local/loss", "participation"):
            assert sorted(got[(f"sites/{site}", tag)]) == [1, 2], (site, tag)


def check_cells(cells, run_index, run):
    """Every numeric cell of run ``run_index`` against metrics.jsonl / cross_site.json; returns how many were checked."""
    recs = metrics(run)
    rounds = {r["round"]: r for r in recs if r["kind"] == "round"}
    site = {(r["round"], r["site"], r["split"], r["model"]): r for r in recs if r["kind"] == "site"}
    cross = json.loads((run / "cross_site.json").read_text())["models"]
    checked = 0
    for c in cells:
        if c.get("run") != str(run_index):
            continue
        table, metric, value = c["table"], c["metric"], float(c["value"])
        rnd = int(c["round"]) if "round" in c else None
        if table == "rounds":
            r = rounds[rnd]
            want = rnd if metric == "round" else r["time"][metric[5:]] if metric.startswith("time/") else r[metric]
        elif table == "sites":
            if metric == "round":
                want = rnd
            elif metric == "train_loss":
                want = site[(rnd, c["site"], "train", "local")]["loss"]
            else:
                want = site[(rnd, c["site"], "val", c["model"])][metric]
        elif table == "cross_site":
            want = cross[c["model"]][c["site"]][metric]
        elif table == "overview" and c.get("kind") == "final":
            want = rounds[rnd][metric]
        elif table == "overview" and c.get("kind") == "best":
            want = max(r[metric] for r in rounds.values())  # val_accuracy, val_mean_dice: larger is better
        else:
            continue
        assert value == want, (c, want)  # the exact value
        text = c["text"].strip()
        decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        assert abs(float(text) - want) <= 0.5 * 10 ** -decimals + 1e-12, (c, want)  # the shown, rounded value
        checked += 1
    return checked


CELLS_JS = """[...document.querySelectorAll('td[data-value]')].map(td => Object.assign(
  {table: td.closest('table').dataset.table, text: td.textContent}, td.dataset))"""
IMAGES_JS = """Promise.all([...document.images].map(i => i.decode().then(() => null, () => null))).then(() =>
  [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
                                  scheme: i.src.slice(0, 15)})))"""


def test_report_opens_in_chromium_without_errors_and_its_tables_equal_metrics_jsonl(runs, tmp_path):
    digits, tiles = runs
    out = tmp_path / "both.html"
    r = hpcfl("report", digits, tiles, "-o", out, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"report: {out}", r.stdout + r.stderr
    r = hpcfl("report", digits, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"report: {digits / 'report.html'}", r.stderr
    html = out.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, offline
    browser = Chromium(tmp_path)
    try:
        page = browser.open(out.resolve().as_uri())
        images = browser.evaluate(page, IMAGES_JS)
        cells = browser.evaluate(page, CELLS_JS)
        title = browser.evaluate(page, "document.title")
        png = browser.screenshot(page)
        errors = browser.errors(page)
    finally:
        browser.close()
    assert errors == []
    assert title == "hpcfl report: digits-2x2, quickstart"
    alts = [i["alt"] for i in images]
    for want in ("runs compared", "digits-2x2: validation accuracy and loss per site per round",
                 "digits-2x2: time breakdown per round", "digits-2x2: participation per round",
                 "digits-2x2: cross-site accuracy", "quickstart: validation accuracy and loss per site per round"):
        assert want in alts, alts
    thumbs = [i for i in images if i["alt"].startswith("tiling of slide-")]
    assert len(thumbs) == 4
    bad = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert bad == [] and all(i["scheme"].startswith("data:image/") for i in images)
    from PIL import Image

    shot = Image.open(io.BytesIO(png)).convert("RGB")
    assert shot.size == (1280, 2400)
    assert len(shot.getcolors(maxcolors=1 << 20) or []) > 200, "the screenshot is (nearly) blank"
    n = check_cells(cells, 0, digits)
    # rounds table: 2 rounds x (round + 9 metrics present) at least; sites table: 2 rounds x 2 sites x 7
    assert n >= 2 * 8 + 2 * 2 * 7 + 3 * 2, n
    assert check_cells(cells, 1, tiles) >= 8


@pytest.mark.parametrize("slack", [1, 400])
def test_status_of_a_running_launch_shows_the_round_in_progress_then_stop_ends_it(tmp_path, slack):
    """The run is held at the start of round 2 (debug.hold) until the test has looked and asked to stop: with
    one round of slack or 400 the outcome is the same, however fast this machine trains."""
    rounds = 2 + slack
    hold = tmp_path / "hold"
    log = open(tmp_path / "launch.log", "w")
    launch = subprocess.Popen([sys.executable, "-m", "hpcfl", "launch", "configs/digits-2x2.yaml",
                               *sets(f"run.root={tmp_path}", f"fl.rounds={rounds}", "fl.local_steps=8",
                                     "train.batch_size=16", held(hold, 2))],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run = tmp_path / "digits-2x2"
    try:
        seen = None
        t = time.monotonic()
        while seen is None:
            assert launch.poll() is None, (tmp_path / "launch.log").read_text()
            assert time.monotonic() - t < 400, "status never showed round 2 in progress"
            r = hpcfl("status", run, timeout=120) if run.exists() else None
            if r is not None and r.returncode == 0 and "round 2/" in r.stdout:
                seen = r.stdout
            time.sleep(0.5)
        head = seen.splitlines()[0]
        assert head.startswith(f"{run}: running, round 2/{rounds} in progress, ETA"), seen
        n = len(json.loads((run / "manifest.json").read_text())["ranks"])  # 5, or fewer when ranks serve several sites
        assert f"ranks: {n}/{n} alive" in seen and "hospital-a" in seen and "hospital-b" in seen, seen
        assert "round 1: val_accuracy" in seen
        r = hpcfl("stop", run, timeout=120)
        assert r.returncode == 0 and "asked" in r.stdout, r.stderr
        hold.unlink()
        assert launch.wait(timeout=300) == 0, (tmp_path / "launch.log").read_text()
    finally:
        hold.unlink(missing_ok=True)
        if launch.poll() is None:
            launch.terminate()
            launch.wait(timeout=60)
        log.close()
    r = hpcfl("status", run, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"{run}: stopped, "), r.stdout
    assert json.loads((run / "summary.json").read_text())["stopped_after_round"] == 2  # the held round, then stop
    r = hpcfl("stop", run, timeout=120)
    assert r.returncode != 0 and "already stopped" in r.stderr
