"""The user's window, end to end: a real `mlflow server` on 127.0.0.1, an ensemble trained and a deletion
made through its tracking URI, then the MLflow UI loaded in headless Chromium (Debian's `chromium`), which
must show the fit run, its shard child runs and the deletion run. The screenshot is saved to
test-artifacts/mlflow-ui.png. Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe), so no driver or websocket package is needed."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, scan, tiny_config, tiny_data, weight_needles
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.cli.commands import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
pytestmark = pytest.mark.slow


class Chromium:
    """Headless Chromium driven by Chrome DevTools protocol messages on fds 3/4 (NUL-separated JSON)."""

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--remote-debugging-pipe",
    ]

    def __init__(self, binary: str, profile: Path, width=1600, height=1000):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        args = [*self.FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(  # the shell only moves our pipe ends to the fds Chromium expects
            ["bash", "-c", f'exec 3<&{to_r} 4>&{from_w}; exec "$0" "$@"', binary, *args],
            pass_fds=(to_r, from_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = end - time.time()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} within {timeout}s")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buf += chunk

    def goto(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", self.session, expression=expr, returnByValue=True)
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, needles: list[str], timeout: float = 40, each=None) -> str:
        end, text = time.time() + timeout, ""
        while time.time() < end:
            if each:
                each()
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.4)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"the MLflow UI does not show {missing}; it shows:\n{text[:3000]}")

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", self.session, format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_w)
        os.close(self._from_r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(cmd: list[str], port: int, log_path: Path, env: dict | None = None):
    """Run a server command in its own process group until /health answers; stop the group afterwards."""
    env = {**os.environ, **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"{cmd[:4]} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group we started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with lean settings: one worker, no job runner, sqlite + local artifacts in tmp."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    cmd += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    with _serving(cmd, port, tmp_path / "server.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as url:
        yield url, tmp_path / "server-artifacts"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_sisa_ui_serves_the_workdirs_store(tmp_path):
    X, y, ids = tiny_data(n=120)
    off = SisaEnsemble.from_config(tiny_config(), tmp_path / "off").fit(X, y, ids=ids)
    res = CliRunner().invoke(main, ["ui", "--workdir", str(off.workdir.path)])
    assert res.exit_code == 2 and "tracking.enabled is false" in res.output

    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), tmp_path / "w").fit(X, y, ids=ids)
    port = _free_port()
    cmd = [sys.executable, "-m", "sisa.cli", "ui", "--workdir", str(ens.workdir.path), "--port", str(port)]
    with _serving(cmd, port, tmp_path / "ui.log") as url:
        q = urllib.parse.quote(ens._ctx.tracker().experiment)
        exp = json.loads(_get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={q}"))["experiment"]
        body = {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`sisa.operation` = 'fit'"}
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        fit = next(r for r in json.loads(_get(req))["runs"] if r["info"]["run_name"] == "fit")
        png = _get(f"{url}/get-artifact?path=plots/shard_sizes.png&run_uuid={fit['info']['run_id']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"  # the plots in the workdir's mlartifacts are served


def test_ui_shows_the_fit_its_shards_and_the_deletion(tmp_path, mlflow_server):
    if CHROMIUM is None:
        pytest.skip(
            "headless Chromium is not installed: `apt-get install chromium` (Debian's package; .ci/run installs it)"
        )
    url, server_artifacts = mlflow_server
    X, y, ids = tiny_data(n=180)
    cfg = tiny_config(name="demo-ui", tracking={"enabled": True, "uri": url})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids, eval_set=(X[:40], y[:40]))
    gone = ["u-3", "u-4", "u-5"]
    old_weights = weight_needles(ens, sorted({ens.shard_of(i)[0] for i in gone}))
    assert {n for _, n in scan(server_artifacts, old_weights)} == set(old_weights)
    receipt = ens.delete(gone)

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs = client.search_runs([exp])
    parents = {r.data.tags["sisa.operation"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    delete_name = parents["delete"].info.run_name
    assert delete_name == f"delete {receipt.request_id[-8:]}"
    # purged through the server too: only the current version's model folder is left in its artifact store
    current = client.get_model_version_by_alias(ens._ctx.tracker().model_name, "current")
    models = {p.name for p in (server_artifacts / exp / "models").iterdir()}
    assert models == {current.source.removeprefix("models:/")}
    assert scan(server_artifacts, old_weights) == [] and scan(tmp_path, old_weights) == []

    b = Chromium(CHROMIUM, tmp_path / "chromium-profile")
    try:
        b.goto(f"{url}/#/experiments/{exp}/runs")
        b.wait_for(["Training runs", "fit", delete_name[:12], "matching runs"])
        b.js("document.querySelectorAll('[aria-label=\"Close\"]').forEach(e => e.click())")  # the assistant panel
        expand = (
            "document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]').forEach(e => e.click())"
        )
        shards = [f"shard-{s:03d}" for s in range(3)]
        text = b.wait_for(shards, each=lambda: b.js(expand) if "shard-000" not in b.text() else None)
        # the fit's three children and the deletion's children are all listed
        assert text.count("shard-") == 3 + len(receipt.shards)
        time.sleep(0.5)
        png = b.screenshot(ARTIFACTS / "mlflow-ui.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

        b.goto(f"{url}/#/experiments/{exp}/runs/{parents['delete'].info.run_id}")
        b.wait_for([delete_name, "rows_deleted", "speedup", "ensemble_accuracy_before"])
        b.screenshot(ARTIFACTS / "mlflow-ui-deletion.png")
    finally:
        b.close()
    assert np.array_equal(ens.predict(X), ens.predict(X))  # the ensemble still serves after the UI checks
