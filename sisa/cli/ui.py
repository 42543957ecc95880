"""`sisa ui`: the MLflow UI on a workdir's tracking store, run as one foreground command that stops cleanly.

- The port: ``--port N`` is used as given, and refused (exit 2, with a hint) when something already listens
  there. Without ``--port``, 5000 if it is free, else a free port the OS picks; the URL says which.
- The server (`mlflow server`, which runs uvicorn in a child process) starts in its own session, so it has
  its own process group. SIGINT (Ctrl-C), SIGTERM and SIGHUP to `sisa ui` stop that whole group: SIGTERM,
  then SIGKILL after `STOP_SECONDS`, and `sisa ui` returns only when no process of the group is left.
- The server's own log (uvicorn's lines, MLflow's notices, deprecation warnings) is shown with `sisa -v ui`;
  otherwise it is kept in a temporary file and printed only if the server fails to start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import click

DEFAULT_PORT = 5000
START_SECONDS = 180.0  # a first start creates the store's tables; a busy machine is slow
STOP_SECONDS = 10.0
HOST = "127.0.0.1"


def port_free(port: int) -> bool:
    """Whether a server could listen on HOST:port now (bound the way uvicorn binds: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_port(port: int | None) -> int:
    """``port`` if free (exit 2 with a hint if not); with None, DEFAULT_PORT or else any free port."""
    if port is not None:
        if not port_free(port):
            click.echo(
                f"error: port {port} on {HOST} is already in use (another `sisa ui` or MLflow server?); "
                "pass another --port, or leave --port out to use a free one",
                err=True,
            )
            sys.exit(2)
        return port
    if port_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve(cmd: list[str], env: dict, port: int, what: str, verbose: bool) -> int:
    """Run the server until it exits or a signal asks to stop; returns the exit status for `sisa ui`."""
    url = f"http://{HOST}:{port}"
    log = None if verbose else tempfile.TemporaryFile()
    signals: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: signals.append(n)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True)
    try:
        click.echo(f"starting the MLflow UI for {what} on {url} ...")
        ready = _wait_ready(proc, url, signals)
        if ready:
            click.echo(f"MLflow UI on {url}  (Ctrl-C to stop)")
        while not signals and proc.poll() is None:
            time.sleep(0.2)
        if signals:
            return 0
        click.echo(f"error: the MLflow server exited (status {proc.returncode})", err=True)
        if log is not None:
            log.seek(0)
            click.echo(log.read().decode(errors="replace")[-3000:], err=True)
        return proc.returncode or 1
    finally:
        _stop_group(proc, signals)
        for s, h in old.items():
            signal.signal(s, h)
        if signals:
            click.echo(f"stopped the MLflow UI on {url}")
        if log is not None:
            log.close()


def _wait_ready(proc: subprocess.Popen, url: str, signals: list) -> bool:
    end = time.monotonic() + START_SECONDS
    while not signals and proc.poll() is None and time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop_group(proc: subprocess.Popen, signals: list) -> None:
    """SIGTERM the server's process group, SIGKILL it after STOP_SECONDS (or at a second Ctrl-C), and wait
    until no process of the group is left: nothing keeps serving after `sisa ui` returns."""
    pgid, asked = proc.pid, len(signals)
    _signal_group(pgid, signal.SIGTERM)
    end = time.monotonic() + STOP_SECONDS
    while True:
        proc.poll()  # reap the leader; its orphaned children are reaped by init
        if not _group_alive(pgid):
            return
        if time.monotonic() > end or len(signals) > asked:
            _signal_group(pgid, signal.SIGKILL)
            end = float("inf")
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
