"""Only verified models are served: the registered MLflow model refuses tampered weights or planted code
at load time (and never runs the planted code), `sisa audit --all` fails on each tamper and names the
file, passes on an untouched ensemble without writing into the workdir, and catches a surviving version
that saw deleted rows."""

import hashlib
import re
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import tiny_config, tiny_data
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from shards.errors import IntegrityError
from sisa import SisaEnsemble
from sisa.audit.cli import audit as audit_cmd


def load_model(uri, tracking_uri):
    from sisa.tracking.pyfunc import load_model as verified_load  # imported here: absent before this feature

    return verified_load(uri, tracking_uri)


def _published(tmp_path, monkeypatch, delete=()):
    X, y, ids = tiny_data(n=150)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    if delete:
        ens.delete(list(delete))
    uri = f"sqlite:///{w / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = MlflowClient(uri, registry_uri=uri)
    name = ens._ctx.tracker().model_name
    mv = client.get_model_version_by_alias(name, "current")
    root = w / "mlartifacts" / "models" / mv.source.removeprefix("models:/") / "artifacts"
    assert (root / "MLmodel").exists()
    return ens, X, uri, client, name, root


def _audit(w, *extra):
    res = CliRunner().invoke(audit_cmd, ["--workdir", str(w), "--all", *extra])
    return res.exit_code, res.output


def _row(out: str, result: str, check: str) -> bool:
    """The audit's table has a row ``mlflow <result> <check>``."""
    return re.search(rf"^mlflow\s+{result}\s+{re.escape(check)}$", out, re.M) is not None


def _snapshot(w: Path) -> dict:
    """Every file's digest, but sqlite's `-shm` files: a WAL database's shared-memory index, which a reader
    updates (it holds no rows, and sqlite rebuilds it)."""
    files = (p for p in w.rglob("*") if p.is_file() and not p.name.endswith("-shm"))
    return {p.relative_to(w).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_flipped_exponent_bit_in_weights_is_refused_and_audit_fails(tmp_path, monkeypatch):
    ens, X, uri, _, name, root = _published(tmp_path, monkeypatch)
    s = ens.active_shards()[-1]
    path = root / "data" / "ensemble" / "shards" / f"{s}.pt"
    weights = torch.load(path, weights_only=True)
    needle = max(weights.values(), key=lambda t: t.numel()).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + 3] ^= 0x40  # the top exponent bit of the first float32 (little endian)
    path.write_bytes(bytes(data))
    flipped = torch.load(path, weights_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(weights.values(), flipped.values()))

    with pytest.raises(IntegrityError, match=rf"shards/{s}\.pt: its sha256 is not the one recorded"):
        mlflow.pyfunc.load_model(f"models:/{name}@current")
    with pytest.raises(IntegrityError, match=rf"shards/{s}\.pt: sha256 differs from the published digest"):
        load_model(f"models:/{name}@current", uri)
    code, out = _audit(ens.workdir.path)
    assert code == 1, out
    assert _row(out, "FAIL", "@current artifact files = the digests recorded at publish"), out
    assert f"{root}/data/ensemble/shards/{s}.pt: sha256 differs" in out

    # the fix the error message names: publish again, then the registered model loads and predicts again
    from sisa.audit.cli import publish as publish_cmd

    res = CliRunner().invoke(publish_cmd, ["--workdir", str(ens.workdir.path)])
    assert res.exit_code == 0, res.output
    model = mlflow.pyfunc.load_model(f"models:/{name}@current")
    assert np.array_equal(model.predict(X), ens.predict(X))
    code, out = _audit(ens.workdir.path)
    assert code == 0, out


def test_a_code_line_added_to_the_artifact_never_runs(tmp_path, monkeypatch):
    ens, X, uri, _, name, root = _published(tmp_path, monkeypatch)
    marker = tmp_path / "planted-code-ran"
    line = f"\nopen({str(marker)!r}, 'w').write('ran')\n"
    scripts = sorted(root.rglob("*.py"))
    for p in scripts:  # a model saved "from code" executes its script from the artifact at load time
        p.write_text(p.read_text() + line)
    planted = root / "data" / "ensemble" / "sisa_ensemble.py"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(line)

    with pytest.raises(IntegrityError, match=r"sisa_ensemble\.py: is not part of a sisa ensemble model"):
        mlflow.pyfunc.load_model(f"models:/{name}@current")
    assert not marker.exists()
    assert scripts == [], "the artifact carries no code: MLflow imports the installed sisa.tracking.pyfunc"
    conf = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    assert conf["loader_module"] == "sisa.tracking.pyfunc" and not conf.get("code")
    with pytest.raises(IntegrityError, match=r"sisa_ensemble\.py: a file that was not published"):
        load_model(f"models:/{name}@current", uri)
    assert not marker.exists()
    code, out = _audit(ens.workdir.path)
    assert code == 1 and f"{planted}: a file that was not published" in out, out
    assert not marker.exists()


def test_an_mlmodel_pointed_at_planted_code_is_refused_before_mlflow_reads_it(tmp_path, monkeypatch):
    """Whoever rewrites MLmodel decides what `mlflow.pyfunc.load_model` imports; `sisa.tracking.pyfunc.load_model`
    checks every file against the registry's digests first, and the audit names MLmodel."""
    ens, X, uri, _, name, root = _published(tmp_path, monkeypatch)
    marker = tmp_path / "planted-loader-ran"
    (root / "code").mkdir()
    (root / "code" / "evil_loader.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\ndef _load_pyfunc(path):\n    raise SystemExit\n"
    )
    meta = yaml.safe_load((root / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(loader_module="evil_loader", code="code")
    (root / "MLmodel").write_text(yaml.safe_dump(meta))

    with pytest.raises(IntegrityError, match=r"MLmodel: sha256 differs from the published digest"):
        load_model(f"models:/{name}@current", uri)
    assert not marker.exists()
    code, out = _audit(ens.workdir.path)
    assert code == 1, out
    assert f"{root}/MLmodel: sha256 differs" in out and f"{root}/code/evil_loader.py: a file that was not" in out
    assert "runs other code than the installed sisa" in out
    assert not marker.exists()


@pytest.mark.parametrize("after_a_deletion", [False, True], ids=["fit", "deletion"])
def test_an_mlmodel_edited_in_place_is_refused_by_mlflows_own_loader_too(tmp_path, monkeypatch, after_a_deletion):
    """An edit that keeps sisa's loader (the signature's ``proba`` default flipped: probabilities where
    labels were asked for) is refused by plain `mlflow.pyfunc.load_model` as well: ensemble.json records
    MLflow's own files of the version (a staged one's included, `sisa.tracking.registry.stage`)."""
    ens, X, uri, _, name, root = _published(tmp_path, monkeypatch, delete=("u-3",) if after_a_deletion else ())
    labels = mlflow.pyfunc.load_model(f"models:/{name}@current").predict(X[:3])
    assert labels.ndim == 1
    text = (root / "MLmodel").read_text()
    assert "proba" in text
    (root / "MLmodel").write_text(text.replace('"default": false', '"default": true'))
    assert (root / "MLmodel").read_text() != text
    with pytest.raises(IntegrityError, match=r"MLmodel: sha256 differs from the published digest"):
        mlflow.pyfunc.load_model(f"models:/{name}@current")
    (root / "MLmodel").write_text(text)
    (root / "extra.yaml").write_text("a: 1\n")
    with pytest.raises(IntegrityError, match=r"extra.yaml: a file that was not published"):
        mlflow.pyfunc.load_model(f"models:/{name}@current")


def test_audit_passes_on_an_untouched_ensemble_and_writes_nothing(tmp_path, monkeypatch):
    ens, X, uri, client, name, root = _published(tmp_path, monkeypatch, delete=["u-3", "u-40"])
    w = ens.workdir.path
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs = len(client.search_runs([exp]))
    before = _snapshot(w)
    code, out = _audit(w)
    assert code == 0, out
    for check in (
        "publish record signed with the workdir key",
        "@current is the published version of the deployed checkpoints",
        "@current artifact files = the digests recorded at publish",
        "@current loads through the installed sisa.tracking.pyfunc, weights as published",
        "no other model version survives (none that saw deleted rows)",
    ):
        assert _row(out, "pass", check), out
    assert _snapshot(w) == before, "the audit wrote into the workdir"
    assert len(client.search_runs([exp])) == runs, "the audit logged an MLflow run without --log-run"
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))

    code, out = _audit(w, "--log-run")
    assert code == 0 and "MLflow audit run" in out, out
    assert len(client.search_runs([exp])) == runs + 1


def test_audit_catches_a_surviving_version_that_saw_deleted_rows(tmp_path, monkeypatch):
    ens, X, uri, client, name, root = _published(tmp_path, monkeypatch)
    old = tmp_path / "old-version"
    shutil.copytree(root, old)  # the version that will see the deleted rows, kept aside
    receipt = ens.delete(["u-3", "u-4"])
    assert not root.exists(), "the deletion purged the superseded version"
    assert _audit(ens.workdir.path)[0] == 0

    # the old version comes back (a restored backup, a purge that did not run)
    lm = client.create_logged_model(
        client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id,
        name=name,
        tags={"sisa.ensemble": name},
    )
    client.log_model_artifacts(lm.model_id, str(old))
    client.finalize_logged_model(lm.model_id, "READY")
    with _use_tracking_uri(uri):  # a sqlite registry resolves models:/ sources through the global URI
        mv = client.create_model_version(name, source=f"models:/{lm.model_id}", model_id=lm.model_id)
    code, out = _audit(ens.workdir.path)
    assert code == 1, out
    assert _row(out, "FAIL", "no other model version survives (none that saw deleted rows)"), out
    assert f"models:/{name}/{mv.version} (logged model {lm.model_id}) survives" in out
    assert f"superseded by request(s) {receipt.request_id} (it saw the deleted rows)" in out
    assert _row(out, "pass", "@current artifact files = the digests recorded at publish"), out
