"""The publish and purge on a deletion's way to *done* (`sisa.tracking.registry`): one MLflow version left,
carrying every digest in its own tags and verified on load; no tag, row or file of the superseded version
and logged model; a purge killed between the files and the rows finished on open; and a prompt that
holds the ensemble's name never touched (the check `MlflowClient` makes before each alias move and
version delete is made once, when the registered model is first looked up)."""

import json
import signal
import sqlite3

import mlflow
import numpy as np
import pytest
from helpers import delete_killed_at, tiny_config, tiny_data
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.ledger import Ledger
from sisa.tracking import adapter, registry
from sisa.tracking.digest import RECORD, files_under
from sisa.tracking.pyfunc import fingerprint, load_model

GONE = ["u-3", "u-50", "u-77"]


def _fit(w):
    X, y, ids = tiny_data(n=200)
    return SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids), X


def _rows(w, sql: str, *args, db: str = "mlflow.db") -> list:
    db = sqlite3.connect(w / db)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_a_done_deletion_leaves_one_sealed_version_and_nothing_of_the_old_one(tmp_path):
    w = tmp_path / "w"
    ens, X = _fit(w)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    client, name = MlflowClient(uri, registry_uri=uri), ens._ctx.tracker().model_name
    v1 = client.get_model_version_by_alias(name, "current")
    old = adapter.model_id(v1)
    assert _rows(w, "select count(*) from model_version_tags where version = ?", int(v1.version)) == [(4,)]

    assert ens.delete(GONE).timing["state"] == "done"
    v2 = client.get_model_version_by_alias(name, "current")
    rec = json.loads((w / RECORD).read_text())
    assert v2.tags == {
        "sisa.fingerprint": fingerprint(ens._ctx, ens.manifest),
        "sisa.format": "3",
        "sisa.files": json.dumps(rec["files"], sort_keys=True, separators=(",", ":")),
        "sisa.active_shards": ",".join(map(str, ens.active_shards())),
    }
    assert rec["version"] == str(v2.version) and rec["model_id"] == adapter.model_id(v2)
    model = load_model(f"models:/{name}@current", uri)  # every file checked against sisa.files first
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))
    lm = client.get_logged_model(adapter.model_id(v2))
    assert str(lm.status) == "READY" and {k: v for k, v in lm.tags.items() if k.startswith("sisa.")} == {
        "sisa.ensemble": name,
        "sisa.format": "3",
    }

    # the old version: no tag left (MLflow keeps a deleted version's tags), its logged model's rows and
    # folder gone, nothing left soft-deleted
    assert _rows(w, "select count(*) from model_version_tags where version = ?", int(v1.version)) == [(0,)]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [str(v2.version)]
    assert _rows(w, "select model_id, lifecycle_stage from logged_models") == [(adapter.model_id(v2), "active")]
    assert _rows(w, "select count(*) from logged_model_tags where model_id = ?", old) == [(0,)]
    assert not (w / "mlartifacts" / "models" / old).exists()


@pytest.mark.parametrize("change", ["changed", "lost", "added"])
def test_an_mlflow_file_changed_while_the_shards_retrain_is_not_published(tmp_path, monkeypatch, change):
    """MLflow's files of the staged version are hashed as they are written, and again when the version is
    finished: one changed, lost or added meanwhile is not published; the version is logged afresh, whole
    and loadable, and the staged one is purged with the superseded models."""
    w = tmp_path / "w"
    ens, X = _fit(w)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    client, name = MlflowClient(uri, registry_uri=uri), ens._ctx.tracker().model_name
    finish, seen = registry._finish, []

    def planted(tracker, ctx, m, run_id, fp, staged):
        seen.append(staged.model_id)
        if change == "changed":
            with open(staged.local / "MLmodel", "a") as f:
                f.write("# planted while the shards retrained\n")
        elif change == "lost":
            (staged.local / "requirements.txt").unlink()
        else:
            (staged.local / "extra.py").write_text("print('planted')\n")
        return finish(tracker, ctx, m, run_id, fp, staged)

    monkeypatch.setattr(registry, "_finish", planted)
    assert ens.delete(GONE).timing["state"] == "done"
    current = client.get_model_version_by_alias(name, "current")
    assert seen and adapter.model_id(current) != seen[0], "not the staged version"
    model = load_model(f"models:/{name}@current", uri)  # every file checked against sisa.files first
    assert np.array_equal(model.predict(X), ens.predict(X))
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [str(current.version)]
    assert _rows(w, "select count(*) from logged_models where model_id = ?", seen[0]) == [(0,)]


def test_a_purge_killed_between_the_files_and_the_rows_is_finished_on_open(tmp_path):
    w = tmp_path / "w"
    ens, X = _fit(w)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    client, name = MlflowClient(uri, registry_uri=uri), ens._ctx.tracker().model_name
    old = adapter.model_id(client.get_model_version_by_alias(name, "current"))
    ens.close()

    res = delete_killed_at(w, GONE, "before_logged_models_deleted")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [r["state"] for r in Ledger(w / "ledger.db").requests()] == ["effective"]
    assert not (w / "mlartifacts" / "models" / old).exists(), "killed after the files went"
    assert (old, "active") in _rows(w, "select model_id, lifecycle_stage from logged_models"), "before the rows"

    reopened = SisaEnsemble.open(w)
    assert [r["state"] for r in Ledger(w / "ledger.db").requests()] == ["done"]
    v = client.get_model_version_by_alias(name, "current")
    assert _rows(w, "select model_id from logged_models") == [(adapter.model_id(v),)]
    assert np.array_equal(load_model(f"models:/{name}@current", uri).predict(X), reopened.predict(X))


def test_a_prompt_holding_the_ensembles_name_is_refused_and_left_as_it_was(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.genai.register_prompt(name="clash", template="hello {{x}}")
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(tracking={"enabled": True, "experiment": "clash", "uri": uri})
    with pytest.raises(MlflowException, match="already taken by a prompt"):
        SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    prompt = mlflow.genai.load_prompt("prompts:/clash/1")
    assert prompt.template == "hello {{x}}" and prompt.aliases == []
    assert _rows(tmp_path, "select count(*) from model_versions where name = 'clash'", db="shared.db") == [(1,)]


def test_files_under_lists_what_rglob_lists(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    for rel in ("x.txt", "a/y.pt", "a/b/z.json"):
        (root / rel).write_text(rel)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "a" / "to_file").symlink_to(root / "x.txt")
    (root / "a" / "to_dir").symlink_to(outside, target_is_directory=True)
    (root / "broken").symlink_to(tmp_path / "nowhere")
    want = sorted(p for p in root.rglob("*") if p.is_file())
    assert sorted(files_under(root)) == want
    assert [p.relative_to(root).as_posix() for p in want] == ["a/b/z.json", "a/to_file", "a/y.pt", "x.txt"]
    assert files_under(tmp_path / "missing") == [] and files_under(root / "x.txt") == []


@pytest.mark.parametrize("wait", ["done", "effective"], ids=["staged-ahead", "settled"])
def test_every_file_of_a_new_version_is_on_disk_before_the_alias_names_it(tmp_path, monkeypatch, wait):
    """A power loss must not leave ``@current`` naming files that never reached the disk: the version's
    files are synced before it is registered, on the staged path and the plain one."""
    w = tmp_path / "w"
    ens, _ = _fit(w)
    events, real_sync, real_alias = [], registry.sync_paths, adapter.set_alias

    def sync(paths):
        events.append(("sync", set(paths)))
        real_sync(paths)

    def alias(client, name, a, version):
        events.append(("alias", version))
        real_alias(client, name, a, version)

    monkeypatch.setattr(registry, "sync_paths", sync)
    monkeypatch.setattr(adapter, "set_alias", alias)
    ens.delete(GONE, wait=wait)
    if wait == "effective":
        ens.settle()
    uri = f"sqlite:///{w / 'mlflow.db'}"
    client, name = MlflowClient(uri, registry_uri=uri), ens._ctx.tracker().model_name
    v = client.get_model_version_by_alias(name, "current")
    root = adapter.local_path(client.get_logged_model(adapter.model_id(v)).artifact_location)
    files = {str(root / f) for f in json.loads(v.tags["sisa.files"])}
    at = events.index(("alias", v.version))
    assert any(kind == "sync" and files <= paths for kind, paths in events[:at]), events


def test_a_hard_delete_that_fails_leaves_the_request_effective_until_the_next_open(tmp_path, monkeypatch):
    """Only a logged model that is already gone is skipped: a locked or failing database leaves the
    request effective, with the old model's rows in place, and the next open finishes it."""
    w = tmp_path / "w"
    ens, X = _fit(w)
    old = adapter.model_id(
        ens._ctx.tracker().client.get_model_version_by_alias(ens._ctx.tracker().model_name, "current")
    )

    def locked(self, model_id):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(adapter.OwnStore, "hard_delete_logged_model", locked)
    with pytest.raises(MlflowException, match="database is locked"):
        ens.delete(GONE)
    [req] = Ledger(w / "ledger.db").requests()
    assert req["state"] == "effective"
    ens.close()
    monkeypatch.undo()
    reopened = SisaEnsemble.open(w, executor="inprocess")
    assert Ledger(w / "ledger.db").state(req["id"]) == "done"
    assert _rows(w, "select count(*) from logged_models where model_id = ?", old) == [(0,)]
    reopened.close()


def test_a_prompt_registered_under_the_name_after_the_fit_stops_the_publish(tmp_path, monkeypatch):
    """A user deletes the registered model and registers a prompt under its name between two publishes:
    the next publish refuses it (the request stays effective), and the prompt gets no version or alias."""
    w = tmp_path / "w"
    ens, X = _fit(w)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    name = ens._ctx.tracker().model_name
    client = MlflowClient(uri, registry_uri=uri)
    client.delete_registered_model(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.genai.register_prompt(name=name, template="hello {{x}}")
    with pytest.raises(MlflowException, match="taken by a prompt"):
        ens.delete(GONE)
    [req] = Ledger(w / "ledger.db").requests()
    assert req["state"] == "effective"
    assert _rows(w, "select count(*) from model_versions where name = ?", name) == [(1,)], "only the prompt's"
    assert _rows(w, "select count(*) from registered_model_aliases where name = ?", name) == [(0,)]
    ens.close()
