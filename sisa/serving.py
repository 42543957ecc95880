"""Serving: the aggregator a process predicts with, kept in step with deletions other processes commit.

One ``stat()`` of the manifest per prediction: when another process commits a manifest (a deletion that
excludes shards, then swaps in retrained ones), the next prediction reads it, so no process keeps serving
a model that saw deleted rows. While some shards are active, predictions come from them alone. When a
deletion is retraining every active shard, `Server.aggregator` waits up to ``wait_timeout`` seconds for
the new models, then raises `RetrainingError` naming the request and its expected remaining time.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from shards import errors as shard_errors
from shards.errors import RetrainingError
from sisa import manifest as manifests
from sisa.manifest import Manifest

if TYPE_CHECKING:  # torch (aggregate) and sklearn (NotFittedError) load when a prediction needs them
    from sisa.aggregate import Aggregator


class Server:
    def __init__(self, ctx, wait_timeout: float):
        self.ctx, self.wait_timeout = ctx, float(wait_timeout)
        self.manifest: Manifest | None = None
        self._sig: tuple | None = None
        self._agg: Aggregator | None = None
        self.lock = threading.RLock()

    def set(self, m: Manifest | None) -> None:
        """The manifest this process just committed (or read): serve it from now on."""
        with self.lock:
            self.manifest, self._sig, self._agg = m, self._disk_sig(), None
            if m is not None:
                self.ctx.prune_models(m)

    def load(self) -> Manifest:
        """Read the committed manifest and serve it. The file is stat'ed before it is read, so a commit that
        lands in between is noticed by the next `follow_disk` (a harmless re-read), never missed."""
        with self.lock:
            sig = self._disk_sig()
            m = manifests.read(self.ctx.workdir.path)
            self.manifest, self._sig, self._agg = m, sig, None
            self.ctx.prune_models(m)
            return m

    def _disk_sig(self):
        try:
            st = (self.ctx.workdir.path / manifests.FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def follow_disk(self) -> None:
        """Pick up a manifest another process committed. One stat() per call."""
        if self.manifest is None:
            return
        sig = self._disk_sig()
        if sig is not None and sig != self._sig:
            self.manifest, self._sig, self._agg = manifests.read(self.ctx.workdir.path), sig, None
            self.ctx.prune_models(self.manifest)

    def aggregator(self) -> Aggregator:
        start = time.monotonic()
        deadline = start + self.wait_timeout
        wd = self.ctx.workdir
        while True:
            with self.lock:
                self.follow_disk()
                if self._agg is not None:
                    return self._agg
                m = self.manifest
                active = self.ctx.active_shards(m)
                if active:
                    self._agg = self.ctx.aggregator(m, active)
                    return self._agg
                if not any(sh.excluded for sh in m.shards):
                    raise shard_errors.NotFittedError(
                        "no shard holds data any more: every training row of this ensemble has been deleted, "
                        "so there is nothing to predict from; train a new ensemble on the data you still hold"
                    )
            running = wd.busy()  # False: the deletion's process died; the next open() finishes it
            if not running or time.monotonic() >= deadline or wd.holds_lock():
                raise retraining_error(m, running, time.monotonic() - start, self.wait_timeout)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def retraining_error(m: Manifest, running: bool, waited: float, timeout: float) -> RetrainingError:
    """What `predict` raises when a deletion is retraining every active shard."""
    info = m.retraining
    rid = info.request_id if info else None
    shards = [s for s, sh in enumerate(m.shards) if sh.excluded]
    expected = info.expected_seconds if info else None
    remaining = None if expected is None else max(0.0, info.started + expected - time.time())
    who = f"deletion request {rid}" if rid else "a deletion"
    if not running:
        msg = (
            f"every active shard ({shards}) is excluded by {who}, but no process is running it any more; "
            "SisaEnsemble.open(workdir) (or `sisa status`) finishes it, and predictions resume then"
        )
    else:
        eta = "its remaining time is unknown"
        if remaining is not None:
            eta = f"about {remaining:.0f} s of an estimated {expected:.0f} s remain (plan cost x measured throughput)"
        msg = (
            f"{who} is retraining every active shard ({shards}); {eta}. Waited {waited:.1f} s "
            f"(wait_timeout={timeout:g}); predictions resume as soon as it finishes: retry then, or open the "
            "ensemble with a larger wait_timeout"
        )
    return RetrainingError(
        msg, request_id=rid, remaining_seconds=remaining, shards=shards, waited=round(waited, 3), running=running
    )
