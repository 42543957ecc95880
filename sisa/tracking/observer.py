"""Observers: what operations tell the outside world (MLflow runs, progress), as events.

Operations emit events to one `Observer`; the default does nothing. An observer's failure never fails an
operation (`Safe` wraps each call and warns once): logging is a side effect, not part of the promise. What
*is* part of the promise (registering the new model, purging models that saw deleted rows) is not an
observer: it runs as a step of the operation (`sisa.context.OpContext.publish`).
"""

from __future__ import annotations

import warnings


class Observer:
    """Receives an operation's events, in order: ``started``, ``stage`` (per finished stage), then
    ``finished`` or ``failed``. ``run_id`` names the current operation's run, if the observer has one."""

    run_id: str | None = None
    finished_run: str | None = None  # the run the last ``finished`` logged and closed (None: it failed)

    def started(self, op: str, manifest, tags: dict) -> None:
        """``op`` (fit, delete, repair) begins on ``manifest``; ``tags`` (e.g. the request id)."""

    def stage(self, op: str, plan, entry: dict, metrics: dict) -> None:
        """A stage of ``plan.shard`` finished; ``entry`` is its checkpoint, ``metrics`` its figures."""

    def finished(self, op: str, manifest, plans: list, metrics: dict, tags: dict, slices_hit) -> None:
        """The operation committed ``manifest``; ``plans`` are the shards it trained."""

    def failed(self, op: str, error: BaseException) -> None:
        """The operation raised ``error`` (it is re-raised after the observer is told)."""

    def adopt(self, tags: dict) -> bool:
        """True when the run in progress was started with ``tags`` ahead of time (a deletion starts its
        batch's run while its shards retrain, `sisa.ops.overlap`); its stage figures are then dropped, to
        be given again. False: the caller starts one."""
        return False


class Progress(Observer):
    """Calls ``progress(plan, entry, metrics)`` after every stage (the CLI's bars)."""

    def __init__(self, progress):
        self.progress = progress

    def stage(self, op, plan, entry, metrics) -> None:
        self.progress(plan, entry, metrics)


class Many(Observer):
    """Fans every event out to several observers, in order."""

    def __init__(self, *observers: Observer):
        self.observers = [o for o in observers if o is not None]

    @property
    def run_id(self):
        return next((o.run_id for o in self.observers if o.run_id is not None), None)

    @property
    def finished_run(self):
        return next((o.finished_run for o in self.observers if o.finished_run is not None), None)

    def started(self, *a) -> None:
        for o in self.observers:
            o.started(*a)

    def stage(self, *a) -> None:
        for o in self.observers:
            o.stage(*a)

    def adopt(self, tags: dict) -> bool:
        return any([o.adopt(tags) for o in self.observers])

    def finished(self, *a) -> None:
        for o in self.observers:
            o.finished(*a)

    def failed(self, *a) -> None:
        for o in self.observers:
            o.failed(*a)


class Safe(Observer):
    """Runs an observer so that its errors become one warning per operation, never the operation's failure."""

    def __init__(self, inner: Observer):
        self.inner = inner
        self._warned = False

    @property
    def run_id(self):
        return self.inner.run_id

    @property
    def finished_run(self):
        return self.inner.finished_run

    def _call(self, name: str, *a) -> None:
        try:
            getattr(self.inner, name)(*a)
        except Exception as e:  # noqa: BLE001 - logging must never fail an operation
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{type(self.inner).__name__} failed ({type(e).__name__}: {e}); the operation goes on without "
                    "it (check the tracking server)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def started(self, op, manifest, tags) -> None:
        self._warned = False
        self._call("started", op, manifest, tags)

    def stage(self, *a) -> None:
        self._call("stage", *a)

    def adopt(self, tags: dict) -> bool:
        try:
            return self.inner.adopt(tags)
        except Exception:  # noqa: BLE001 - a run that cannot be checked is started afresh
            return False

    def finished(self, *a) -> None:
        self._call("finished", *a)

    def failed(self, *a) -> None:
        self._call("failed", *a)
