"""How long the small commands take, as a user runs them: a fresh `python -m sisa.cli` process each time.

`status`, `locate` and `delete --dry-run` read the workdir only and must start no Ray and import neither
Lightning nor torch (target: under 2 s each). `predict` needs torch and builds the built-in sub-models,
which are LightningModules, so it imports Lightning (but starts no Ray). Each command runs ``repeats``
times; the figure is the median wall time, and ``imports`` lists the heavy modules the process loaded
(from ``python -X importtime``, in one extra run).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEAVY = ("ray", "pytorch_lightning", "lightning", "torch", "mlflow", "sklearn")
TARGET_SECONDS = 2.0


def _cli(args: list[str], importtime: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "sisa.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])


def _heavy_imports(args: list[str]) -> list[str]:
    err = _cli(args, importtime=True).stderr
    loaded = {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    return sorted(set(HEAVY) & loaded)


def run(workdir: Path, an_id, X: np.ndarray, repeats: int = 3) -> dict:
    """{command: {seconds (median), runs, imports, under_target}} for the small commands on ``workdir``."""
    x_path = Path(workdir).parent / "cli-bench-x.npz"
    np.savez(x_path, X=X[:5])
    w = str(workdir)
    commands = {
        "status": ["status", "--workdir", w],
        "locate": ["locate", "--workdir", w, str(an_id)],
        "delete --dry-run": ["delete", "--workdir", w, "--dry-run", str(an_id)],
        "predict": ["predict", "--workdir", w, "--input", str(x_path)],
    }
    out = {}
    for name, args in commands.items():
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = _cli(args)
            runs.append(time.perf_counter() - t)
            if res.returncode != 0:
                raise RuntimeError(f"sisa {name} failed: {res.stderr[-2000:]}")
        med = statistics.median(runs)
        out[name] = {
            "seconds": med,
            "runs": runs,
            "imports": _heavy_imports(args),
            "under_target": med < TARGET_SECONDS,
        }
    x_path.unlink()
    return {"target_seconds": TARGET_SECONDS, "commands": out}
