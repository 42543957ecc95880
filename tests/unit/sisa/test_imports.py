"""The package faces stay light and side-effect free: ``import sisa`` (and `sisa.errors`, `sisa.costmodel`,
`orchestration`) loads no Ray, MLflow, Lightning or torch and changes no warning filter or logger; the
heavy names resolve on first use (PEP 562)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

ROOT = REPO
HEAVY = ("ray", "mlflow", "lightning", "pytorch_lightning", "torch")


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def test_importtime_of_the_faces_shows_no_heavy_package():
    out = _python("import sisa; import sisa.errors; import sisa.costmodel; import orchestration", "-X", "importtime")
    assert out.returncode == 0, out.stderr[-2000:]
    names = _imported(out.stderr)
    assert "sisa.costmodel" in names and "orchestration.base" in names, "the importtime output was parsed"
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert heavy == [], f"import sisa pulled in {heavy[:10]}"
    assert "sklearn" not in {n.split(".")[0] for n in names}, "sisa.errors defers scikit-learn to NotFittedError"


def test_importtime_parser_sees_a_heavy_import():
    """The check above can fail: the same parse finds torch when something does import it."""
    out = _python("import sisa.errors; import torch", "-X", "importtime")
    assert "torch" in _imported(out.stderr)


def test_import_sisa_changes_no_warning_filter():
    out = _python(
        "import warnings; before = list(warnings.filters);"
        "import sisa, sisa.errors, sisa.costmodel, shards, orchestration; print(warnings.filters == before)"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True", "importing sisa changed warnings.filters"


@pytest.mark.parametrize("modules", ["shards.training, shards.job, orchestration.inprocess", "sisa.cli.commands"])
def test_import_changes_no_warning_filter_or_logger_level(modules):
    """With the third-party packages (which set their own filters) already loaded, importing sisa's modules,
    training included, adds no warning filter and lowers no logger."""
    code = f"""
import json, logging, warnings
import numpy, torch, pytorch_lightning, click, pydantic, fsspec, tqdm
loggers = ("pytorch_lightning", "lightning.pytorch")
before = ([repr(f) for f in warnings.filters], [logging.getLogger(n).level for n in loggers])
import {modules}
after = ([repr(f) for f in warnings.filters], [logging.getLogger(n).level for n in loggers])
print(json.dumps({{"added": [f for f in after[0] if f not in before[0]], "levels": [before[1], after[1]]}}))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["added"] == [], f"importing {modules} added warning filters"
    assert res["levels"][0] == res["levels"][1], "importing changed a logger level"


def test_training_silences_lightning_only_while_a_stage_runs():
    import logging
    import warnings

    from shards.training import quiet_training

    before, level = list(warnings.filters), logging.getLogger("pytorch_lightning").level
    with quiet_training():
        with quiet_training():  # re-entrant: a nested stage keeps the silence
            assert logging.getLogger("pytorch_lightning").level == logging.ERROR
        assert logging.getLogger("pytorch_lightning").level == logging.ERROR
        assert any(f[0] == "ignore" and f[1] and "barebones" in f[1].pattern for f in warnings.filters)
    assert warnings.filters == before and logging.getLogger("pytorch_lightning").level == level


@pytest.mark.parametrize(
    "name, module",
    [
        ("SisaEnsemble", "sisa.ensemble"),
        ("SisaConfig", "sisa.config"),
        ("load_config", "sisa.config"),
        ("Receipt", "sisa.ops.receipts"),
        ("DeletionPlan", "sisa.ops.receipts"),
        ("WorkdirError", "shards.errors"),
        ("NotFittedError", "shards.errors"),
    ],
)
def test_lazy_names_resolve(name, module):
    import sisa

    assert name in sisa.__all__ and name in dir(sisa)
    assert getattr(sisa, name).__module__ == module
    ns: dict = {}
    exec(f"from sisa import {name}", ns)
    assert ns[name] is getattr(sisa, name)


def test_unknown_names_are_attribute_errors():
    import orchestration
    import sisa

    with pytest.raises(AttributeError, match="module 'sisa' has no attribute 'Nope'"):
        sisa.Nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'orchestration' has no attribute 'Nope'"):
        orchestration.Nope  # noqa: B018
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        exec("from sisa import Nope", {})


def test_orchestration_resolves_its_executors_on_first_use():
    out = _python(
        "import sys, orchestration; from orchestration import ShardPlan; assert 'ray' not in sys.modules;"
        "from orchestration import RayExecutor, InProcessExecutor; assert 'ray' in sys.modules;"
        "print(RayExecutor.__module__, InProcessExecutor.__module__)"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["orchestration.ray_executor", "orchestration.inprocess"]


def test_the_readme_audit_example_command_exists():
    """README: `sisa audit-example runs/audit-example` (the old `python -m sisa.audit.cli` runner is gone)."""
    from sisa.cli.commands import main

    readme = (ROOT / "README.md").read_text()
    assert "Command: `sisa audit-example runs/audit-example`" in readme
    ctx = main.make_context("sisa", ["audit-example", "runs/audit-example"], resilient_parsing=True)
    assert ctx.protected_args + ctx.args == ["audit-example", "runs/audit-example"]
    sub = main.get_command(ctx, "audit-example")
    assert sub.make_context("audit-example", ["runs/audit-example"]).params == {
        "workdir": "runs/audit-example",
        "seed": 1,
    }
