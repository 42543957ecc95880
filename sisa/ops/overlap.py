"""The part of a deletion's *done* work that does not wait for the retrained weights, done on a background
thread while its shards retrain, so that it is off the critical path (issue 18).

A ``wait="done"`` deletion with tracking on starts, right after it excluded the shards it retrains:
  - the MLflow run of the batch it will settle (`sisa.ops.owed.live_ids`: every effective request not
    logged yet, then this one), which `sisa.ops.owed.open_batch` adopts instead of starting one;
  - the next model version, staged (`sisa.tracking.registry.stage`): its logged model, MLflow's files,
    hard links to the live version's files of the shards it does not retrain, and the purge's list (the
    live version stays ``@current`` until the new one is registered).
Once the request is effective, `sisa.ops.purge.settle` finishes the staged version with the retrained shards'
files, registers it and purges every other version, then marks the request done. What a
request's two moments mean does not change: the publish and the purge of every version that saw its rows
still come before *done*. A background step that fails is left out (settle does its work the usual way,
and reports a failure there); a process killed while they run leaves what a kill at ``batch_run_started``
or ``after_model_written`` leaves, which the next open finishes (a run still RUNNING is closed as KILLED, a
logged model never registered is purged).

Nothing runs beside the steps to *effective* themselves: measured on 2 cores, work on another thread then
(the retrained shards' evaluation, their child runs) slowed them by more than it saved after them.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.ops import owed

OP = "delete"
# Python's GIL switch interval while background steps run (default 5 ms): the thread that drives the
# retrain gets the GIL back within this after each stage's result arrives
SWITCH = 0.0005
HEAD_START = 0.01  # seconds the retrain's dispatch has the interpreter to itself before this work starts
NICE = 10  # the background thread's nice value (Linux): the CPU goes to the retrain's thread first


class Overlap:
    @classmethod
    def start(cls, ctx, m, rid: str, plans: list, wait: str) -> Overlap | None:
        """The work ahead for request ``rid`` (its shard ``plans``, on manifest ``m``) when there is some:
        ``wait="done"``, tracking on, and shards to retrain (an evaluation-row-only deletion has none)."""
        if not plans or wait != "done" or not ctx.config.tracking.enabled:
            return None
        return cls(ctx, m, rid, {p.shard for p in plans})

    def __init__(self, ctx, m, rid: str, retrained: set[int]):
        """Start the run and the staged version for request ``rid`` on manifest ``m`` (before the retrain)."""
        self.ctx, self.rid = ctx, rid
        effective = [r["id"] for r in ctx.ledger().unfinished() if r["state"] == RequestState.EFFECTIVE]
        order = owed.settle_order(ctx, effective + [rid])  # the batch the settle will log, in its order
        live = set(owed.live_ids(ctx, order)) | {rid}
        self.tags = owed.batch_tags([i for i in order if i in live])
        self._closed = False
        _short_switch(+1)  # the training loop's hand-offs wait less for the GIL
        self._mlflow = ThreadPoolExecutor(1, thread_name_prefix="sisa-mlflow", initializer=_background)
        self._run = self._mlflow.submit(self._start_run, m)
        self._staged = self._mlflow.submit(self._stage, m, set(retrained))

    def _start_run(self, m) -> str | None:
        time.sleep(HEAD_START)
        obs = self.ctx.observer
        obs.started(OP, m, self.tags)
        crashpoint("batch_run_started")
        return obs.run_id

    def _stage(self, m, retrained: set[int]):
        from sisa.tracking.registry import stage

        return stage(self.ctx.tracker(), self.ctx, m, self._run.result(), retrained)

    def ready(self) -> None:
        """Wait for the run started ahead (its failure was the observer's warning)."""
        self._run.exception()

    def staged(self):
        """The staged version, or None if staging failed (the publish then writes the whole version)."""
        return _result(self._staged, "staged model version")

    def abort(self) -> None:
        """The deletion raised: the run started ahead is marked failed once the background steps end."""
        self.close()
        self.ctx.observer.failed(OP, None)

    def close(self) -> None:
        """Wait for every background step (none is left running on return). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._mlflow.shutdown(wait=True)
        finally:
            _short_switch(-1)


_switch_lock = threading.Lock()
_switch_users: list = []  # the interval before the first user lowered it, once per user still running


def _short_switch(step: int) -> None:
    """Lower the GIL switch interval while any overlap runs (+1), restore it when the last one ends (-1)."""
    with _switch_lock:
        if step > 0:
            _switch_users.append(_switch_users[0] if _switch_users else sys.getswitchinterval())
            sys.setswitchinterval(min(_switch_users[0], SWITCH))
        elif _switch_users:
            before = _switch_users.pop()
            if not _switch_users:
                sys.setswitchinterval(before)


def _background() -> None:
    """This thread yields the CPU to the one that drives the retrain (Linux: a thread's own nice value)."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: it only runs at the same priority
        pass


def _result(f: Future, what: str):
    try:
        return f.result()
    except Exception as e:  # noqa: BLE001 - done again the usual way by settle
        warnings.warn(f"{what} could not be prepared ahead ({type(e).__name__}: {e}); done in settle", stacklevel=3)
        return None
