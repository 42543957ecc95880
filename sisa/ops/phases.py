"""A lightweight phase timer for an operation's fixed costs (one `perf_counter` pair per phase).

``with phases("slice_rewrite"): ...`` adds the block's wall time to ``phases.seconds["slice_rewrite"]``;
``phases.mark("effective")`` records a moment (seconds since the timer started). A deletion carries its
breakdown in its return value (`sisa.ops.receipts.Receipt.timing`) and in its MLflow run
(``phase_seconds/<name>``), so the benchmark can set each phase against the retraining compute.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    def __init__(self, t0: float | None = None):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.seconds: dict[str, float] = {}
        self.moments: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def mark(self, name: str) -> float:
        """Record the moment ``name`` (seconds since the start) and return it."""
        self.moments[name] = time.perf_counter() - self.t0
        return self.moments[name]

    def to_dict(self) -> dict:
        return {"phase_seconds": dict(self.seconds), "moments": dict(self.moments)}
