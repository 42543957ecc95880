"""Regenerate the README's MLflow UI screenshots: the digits demo ensemble (5 shards x 4 slices) trained,
four rows deleted, then `sisa ui` opened in headless Chromium (Debian's `chromium`).

    .venv/bin/python docs/screenshots.py        # writes docs/mlflow-runs.png and docs/mlflow-deletion.png
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_mlflow_ui import CHROMIUM, Chromium, _free_port, _serving  # noqa: E402

from sisa import SisaEnsemble  # noqa: E402

EXPAND = "document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]').forEach(e => e.click())"
CLOSE_ASSISTANT = "document.querySelectorAll('[aria-label=\"Close\"]').forEach(e => e.click())"


def main() -> None:
    if CHROMIUM is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    tmp = Path(tempfile.mkdtemp(prefix="sisa-docs-"))
    wd = tmp / "runs" / "digits"
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg["tracking"] = {**cfg.get("tracking", {}), "deletion_plots": True}  # the heat map shown below
    ens = SisaEnsemble.from_config(cfg, wd, executor="inprocess").fit()
    receipt = ens.delete(["digits-17", "digits-942", "digits-1000", "digits-1500"])
    ens.close()
    port = _free_port()
    cmd = [sys.executable, "-m", "sisa.cli", "ui", "--workdir", str(wd), "--port", str(port)]
    with _serving(cmd, port, tmp / "ui.log") as url:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
        dele = next(r for r in client.search_runs([exp]) if r.data.tags.get("sisa.request_id") == receipt.request_id)
        b = Chromium(CHROMIUM, tmp / "profile", width=1500, height=900)
        try:
            b.goto(f"{url}/#/experiments/{exp}/runs")
            b.wait_for(["fit", dele.info.run_name, "matching runs"])
            b.js(CLOSE_ASSISTANT)
            b.wait_for(["shard-004"], each=lambda: b.js(EXPAND) if "shard-004" not in b.text() else None)
            time.sleep(1)
            b.screenshot(ROOT / "docs" / "mlflow-runs.png")
            b.goto(f"{url}/#/experiments/{exp}/runs/{dele.info.run_id}/artifacts/plots/retrained_stages.png")
            b.wait_for(["retrained_stages.png"])
            b.js(CLOSE_ASSISTANT)
            time.sleep(2)
            b.screenshot(ROOT / "docs" / "mlflow-deletion.png")
        finally:
            b.close()
    print(f"wrote docs/mlflow-runs.png and docs/mlflow-deletion.png (workdir {wd})")
    print(dele.data.tags["mlflow.note.content"])


if __name__ == "__main__":
    main()
