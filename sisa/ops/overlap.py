"""The part of a deletion's *done* work that does not wait for the retrained weights, done on background
threads while its shards retrain, so that it is off the critical path (issue 18).

A ``wait="done"`` deletion with tracking on starts, right after it excluded the shards it retrains:
  - the MLflow run of the batch it will settle (`sisa.ops.owed.live_ids`: every effective request not
    logged yet, then this one), which `sisa.ops.owed.log_batch` adopts instead of starting one;
  - the next model version, staged (`sisa.tracking.registry.stage`): its logged model, MLflow's files,
    hard links to the live version's files of the shards it does not retrain, and the purge's list; then
    every other version is retired (`sisa.tracking.registry.retire`), before the swap waits for it;
  - as each retrained shard's last stage arrives, its child run (with its test accuracy).
Every deletion that retrains shards on Ray (any ``wait``, tracking on or off) also computes, as each
retrained shard's last stage arrives, that sub-model's outputs on the evaluation rows
(`sisa.context.OpContext.prefetch_outputs`), so that the evaluation in `sisa.ops.purge.settle` (now or
batched later) only combines them. Not with the in-process executor: building a sub-model seeds torch,
and that executor trains on this process's RNG.

Once the request is effective the staged version is finished and registered on the background thread while
`sisa.ops.purge.settle` evaluates and logs the run. What a request's two moments mean does not change: its
run, the publish and the purge of every version that saw its rows still come before *done*. A background
step that fails is left out (settle does its work the usual way, and reports a failure there); a process
killed while they run leaves what a kill at ``batch_run_started`` or ``after_model_written`` leaves, which
the next open finishes (a run still RUNNING is closed as KILLED, a logged model never registered is purged).
"""

from __future__ import annotations

import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.ops import owed

OP = "delete"
# Python's GIL switch interval while background steps run (default 5 ms): the thread that drives the
# retrain gets the GIL back within this after each stage's result arrives
SWITCH = 0.0005


class Overlap:
    @classmethod
    def start(cls, ctx, m, rid: str, plans: list, wait: str) -> Overlap | None:
        """The work ahead for request ``rid`` (its shard ``plans``, on manifest ``m``), when there is some
        (an evaluation-row-only deletion retrains nothing): the outputs prefetched unless the executor is
        in-process, and with ``wait="done"`` and tracking on, the run and the staged version too."""
        mlflow = wait == "done" and ctx.config.tracking.enabled
        if not plans or not (mlflow or ctx.executor_name != "inprocess"):
            return None
        return cls(ctx, m, rid, {p.shard for p in plans}, mlflow)

    def __init__(self, ctx, m, rid: str, retrained: set[int], mlflow: bool = True):
        """Start the run and the staged version for request ``rid`` on manifest ``m`` (before the retrain;
        not without ``mlflow``: a deletion that leaves its bookkeeping owed, or tracking off)."""
        self.ctx, self.rid = ctx, rid
        self._eval = ThreadPoolExecutor(1, thread_name_prefix="sisa-eval") if ctx.executor_name != "inprocess" else None
        self._outputs: list[Future] = []
        self._children: list[Future] = []
        self._published: Future | None = None
        self._mlflow = self._run = self._staged = None
        _short_switch(+1)  # the training loop's hand-offs wait less for the GIL
        if mlflow:
            effective = [r["id"] for r in ctx.ledger().unfinished() if r["state"] == RequestState.EFFECTIVE]
            self.tags = owed.batch_tags(owed.live_ids(ctx, effective) + [rid])
            self._mlflow = ThreadPoolExecutor(1, thread_name_prefix="sisa-mlflow")
            self._run = self._mlflow.submit(self._start_run, m)
            self._staged = self._mlflow.submit(self._stage, m, set(retrained))

    def _start_run(self, m) -> str | None:
        obs = self.ctx.observer
        obs.started(OP, m, self.tags)
        crashpoint("batch_run_started")
        return obs.run_id

    def _stage(self, m, retrained: set[int]):
        from sisa.tracking.registry import stage

        return stage(self.ctx.tracker(), self.ctx, m, self._run.result(), retrained)

    def on_stage(self, m, spec):
        """The retrain's per-stage callback ``cb(plan, entry, figures)`` (``figures``: the shard's stages so
        far): at a shard's last stage (of ``spec``) its outputs on the evaluation rows are computed and,
        when this request is the batch, its child run logged with its test accuracy (``m``: the manifest
        the shard trains in). Neither with the in-process executor (the child is logged with its parent)."""
        from sisa.manifest import Checkpoint

        def cb(plan, entry, figures):
            if entry["stage"] != plan.stages(spec):
                return
            if self._eval is None:
                return
            ev = self._eval.submit(self.ctx.prefetch_outputs, plan.shard, Checkpoint.from_dict(entry), m)
            self._outputs.append(ev)
            if self._mlflow is not None and owed.REQUEST_ID in self.tags:  # a batch: one child, all requests' stages
                self._children.append(self._mlflow.submit(self._child, m, plan, list(figures), ev))

        return cb

    def _child(self, m, plan, figures: list[dict], ev: Future) -> None:
        self.ctx.observer.shard_done(OP, m, plan, figures, _result(ev, f"shard {plan.shard}'s evaluation outputs"))

    def ready(self) -> None:
        """Wait for the run started ahead, the prefetched outputs (a failed one is computed again by the
        evaluation) and the child runs (one not logged is logged with its parent)."""
        if self._run is not None:
            self._run.exception()  # its failure was the observer's warning
        for f in self._outputs:
            _result(f, "evaluation outputs")
        for f in self._children:
            _result(f, "child run")

    def publish(self, m) -> None:
        """Publish ``m`` (the swapped manifest) from the staged version and purge, on the background thread."""
        if self._mlflow is not None:
            self._published = self._mlflow.submit(self._publish, m)

    def _publish(self, m) -> bool:
        staged = _result(self._staged, "staged model version")
        if staged is None:
            return False
        self.ctx.publish(m, purge=True, request_id=self.rid, run_id=self._run.result(), staged=staged)
        return True

    def published(self) -> bool:
        """Wait for `publish`; False if it did not happen (settle publishes the usual way)."""
        return self._published is not None and bool(_result(self._published, "model version"))

    def abort(self) -> None:
        """The deletion raised: the run started ahead is marked failed once the background steps end."""
        self.close()
        if self._run is not None:
            self.ctx.observer.failed(OP, None)

    def close(self) -> None:
        """Wait for every background step (none is left running on return)."""
        try:
            if self._mlflow is not None:
                self._mlflow.shutdown(wait=True)
            if self._eval is not None:
                self._eval.shutdown(wait=True)
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


def _result(f: Future, what: str):
    try:
        return f.result()
    except Exception as e:  # noqa: BLE001 - done again the usual way by settle
        warnings.warn(f"{what} could not be prepared ahead ({type(e).__name__}: {e}); done in settle", stacklevel=3)
        return None
