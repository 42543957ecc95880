"""The workdir: its paths, config copy, secret key and lock (the manifest itself: `sisa.manifest`).

Whatever the manifest does not reference in the store is garbage and is purged (`purge_unreferenced`). The
workdir lock (flock, plus a thread lock) serialises training and deletion across threads and processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from shards.errors import ConfigError, WorkdirError
from shards.partition import id_bytes
from shards.storage import Storage, write_atomic, zero_and_remove  # noqa: F401  (write_atomic: re-exported)

NOT_WALKED = ("mlartifacts", "store")  # top-level folders `Workdir.remove_temp_files` leaves to others
_thread_locks: dict[str, threading.RLock] = {}
_guard = threading.Lock()
_held = threading.local()


class Workdir:
    def __init__(self, path):
        self.path = Path(path).expanduser().resolve()

    # -- files ------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def remove_temp_files(self) -> None:
        """Temp files of atomic writes that a killed process left behind. MLflow's artifact tree is not
        walked (sisa writes nothing there atomically; it grows with every run), nor the store (its temp
        files are `purge_unreferenced`'s)."""
        for top, dirs, files in os.walk(self.path):
            if top == str(self.path):
                dirs[:] = [d for d in dirs if d not in NOT_WALKED]
            for name in files:
                if name.startswith(".") and ".tmp-" in name[1:]:
                    zero_and_remove(Path(top) / name)  # it may hold rows (an evaluation file) or weights

    def remove_stale_copies(self) -> None:
        """Copies of rows that a killed process left in the workdir: temp files of atomic writes, a fit's
        evaluation file before its rename and its spill directories (zeroed first). Call it holding the lock."""
        from shards.ingest import wipe_stale_spills

        self.remove_temp_files()
        zero_and_remove(self.path / ".eval-ingest.npy")
        wipe_stale_spills(self.path)

    def busy(self) -> bool:
        """True while a process (this one included) holds the workdir lock: a fit, deletion or repair runs.
        A shared-lock probe that is released at once; a process that died holds no lock."""
        if self.holds_lock():
            return True
        try:
            f = open(self.path / ".lock", "rb")
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def holds_lock(self) -> bool:
        """True when the calling thread holds the workdir lock."""
        return str(self.path) in getattr(_held, "paths", ())

    def secret(self) -> bytes:
        """Key for hashing ids in the ledger and receipts; created once per workdir."""
        p = self.path / "secret.key"
        if not p.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
        return p.read_bytes()

    def hash_ids(self, ids) -> list[str]:
        keyed = hmac.new(self.secret(), digestmod=hashlib.sha256)  # keyed once, copied per id
        out = []
        for i in ids:
            h = keyed.copy()
            h.update(id_bytes(i))
            out.append(h.hexdigest())
        return out

    def storage(self, uri: str | None, options: dict | None = None) -> Storage:
        return Storage(self.storage_root(uri), options)

    def storage_root(self, uri: str | None) -> str:
        """``storage.uri``: a path inside the workdir, an object-store URI (s3://...), or an explicit
        ``file:///abs/path`` (a shared mount every node sees). sisa claims a root outside the workdir only
        if it is empty or already this workdir's (`Storage.claim`), so it never purges files it did not write."""
        if uri is None:
            return str(self.path / "store")
        if uri.startswith("file://"):
            path = uri.removeprefix("file://")
            if not path.startswith("/"):
                raise ConfigError(
                    f"storage.uri={uri!r}: a file:// URI needs an absolute path (file:///mnt/shared/sisa/run1); "
                    "a relative path without file:// is resolved inside the workdir",
                    problems=["storage.uri: relative file:// URI"],
                )
            return uri
        if "://" in uri:
            return uri
        return str(self.inside(uri, "storage.uri"))

    def inside(self, rel: str, what: str) -> Path:
        """Resolve a path from a config against the workdir and refuse anything outside it."""
        p = (self.path / rel).resolve()
        if p != self.path and self.path not in p.parents:
            raise ConfigError(
                f"{what}={rel!r} points outside the workdir {self.path}; config paths must stay inside it",
                problems=[f"{what}: outside the workdir"],
            )
        return p

    # -- locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, timeout: float | None = None, what: str = "this operation"):
        """Exclusive lock on the workdir; waits up to ``timeout`` s ($SISA_LOCK_TIMEOUT, default 600)."""
        if timeout is None:
            timeout = float(os.environ.get("SISA_LOCK_TIMEOUT", "600"))
        held = _held.__dict__.setdefault("paths", set())
        if str(self.path) in held:  # re-entered by the thread that holds it
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with _guard:
            tlock = _thread_locks.setdefault(str(self.path), threading.RLock())
        if not tlock.acquire(timeout=timeout):
            raise WorkdirError(f"{self.path} is busy in another thread; {what} gave up after {timeout:.0f}s")
        try:
            with open(self.path / ".lock", "a+") as f:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise WorkdirError(
                                f"{self.path} is locked by another process (training or deleting); "
                                f"{what} gave up after {timeout:.0f}s. Wait for it to finish, or use another workdir"
                            ) from None
                        time.sleep(0.05)
                held.add(str(self.path))
                try:
                    yield
                finally:
                    held.discard(str(self.path))
                    fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            tlock.release()


def purge_unreferenced(storage: Storage, manifest, on_delete=None) -> list[str]:
    """Delete every data/checkpoint/base file ``manifest`` (a `sisa.manifest.Manifest`, or None: keep nothing) does
    not reference: superseded or half-written files. Each file is zeroed, the zeros made durable (one sync
    for all), then removed (`Storage.delete_many`)."""
    keep = manifest.referenced_files() if manifest is not None else set()
    gone = [
        rel
        for rel in storage.listdir()
        if (rel.startswith(("data/", "ckpt/", "base/")) and rel not in keep) or os.path.basename(rel).startswith(".tmp-")
    ]
    storage.delete_many(gone, on_delete)
    return gone
