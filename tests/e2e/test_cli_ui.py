"""`sisa ui` as a person runs it: it stops cleanly on SIGTERM and on Ctrl-C (SIGINT), leaving no MLflow server
or uvicorn worker behind and printing no traceback, and it refuses a port that is already in use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_config, tiny_data

from sisa import SisaEnsemble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    X, y, ids = tiny_data(n=120)
    w = tmp_path_factory.mktemp("ui") / "w"
    SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    return w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_ui(workdir: Path, port: int) -> tuple[subprocess.Popen, int]:
    """`sisa ui` in its own session, once it serves; returns it and the process group of its server."""
    cmd = [sys.executable, "-m", "sisa.cli", "ui", "--workdir", str(workdir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    end = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < end, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.3)
    servers = _children(proc.pid)
    assert len(servers) == 1, servers  # the `mlflow server` process
    return proc, os.getpgid(servers[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_whole_server_on_a_signal(workdir, sig):
    port = _free_port()
    proc, server_group = _start_ui(workdir, port)
    try:
        proc.send_signal(sig)  # to `sisa ui` alone, as `kill` or a supervisor sends it
        out, _ = proc.communicate(timeout=60)
        assert not _group_alive(server_group)  # neither the MLflow server nor its uvicorn worker is left
        assert not _listening(port)
        assert "Traceback" not in out and "KeyboardInterrupt" not in out
        assert proc.returncode == 0 and len(out.splitlines()) <= 4 and "stopped the MLflow UI" in out, out
    finally:
        for g in (server_group, proc.pid):
            if _group_alive(g):
                os.killpg(g, signal.SIGKILL)
        proc.wait(10)


def test_ui_refuses_a_busy_port_with_a_hint(workdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "sisa.cli", "ui", "--workdir", str(workdir), "--port", str(port)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert res.returncode == 2 and f"port {port}" in res.stderr and "--port" in res.stderr
    assert "MLflow UI on" not in res.stdout  # no URL for a server that cannot start
