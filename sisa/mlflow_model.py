"""The ensemble as an MLflow pyfunc model: what `Tracker` logs and registers for each ensemble version.

A version is saved as a "model from code" (no pickle): a three-line loader script, plus two artifacts,
``ensemble.json`` (architecture, input shape, classes, aggregation, shard digests) and ``weights.pt``
(the active sub-models' state dicts, read back with ``torch.load(weights_only=True)``). Loading it needs
``sisa`` importable (and the user's model package, for a model given by import path):

    model = mlflow.pyfunc.load_model("models:/<name>@current")
    model.predict(X)                       # labels, equal to SisaEnsemble.predict(X)
    model.predict(X, params={"proba": True})  # class probabilities, equal to predict_proba

The input is an array of shape (n, *input_shape) or a DataFrame with one numeric column per feature
(rows flattened). No row of the training data is ever written here: the signature is built from shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
ARTIFACT = "ensemble"
LOADER = """# sisa ensemble loader (MLflow model from code); needs the `sisa` package importable.
import mlflow

from sisa.mlflow_model import SisaPyfunc

mlflow.models.set_model(SisaPyfunc())
"""


def fingerprint(ens, manifest: dict) -> str:
    """Identity of an ensemble version: the active shards' final checkpoints and the aggregation."""
    c = ens.config.aggregation
    parts = [f"{s}:{manifest['shards'][s]['checkpoints'][-1]['sha256']}" for s in ens.active_shards(manifest)]
    parts.append(f"agg:{c.method}:{c.weights}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def export(ens, manifest: dict, directory: Path) -> dict:
    """Write ensemble.json and weights.pt for the manifest's active shards into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    active = ens.active_shards(manifest)
    spec = ens.spec(manifest)
    c = ens.config
    meta = {
        "format": FORMAT,
        "name": c.name,
        "model": spec.model,
        "model_kwargs": dict(spec.model_kwargs),
        "optim": dict(spec.optim),
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "aggregation": {"method": c.aggregation.method, "weights": c.aggregation.weights},
        "shards": active,
        "checkpoints": {str(s): manifest["shards"][s]["checkpoints"][-1]["sha256"] for s in active},
        "config_hash": manifest["config_hash"],
        "fingerprint": fingerprint(ens, manifest),
    }
    weights = {str(s): ens.load_shard_model(s, manifest).state_dict() for s in active}
    torch.save(weights, directory / "weights.pt")
    (directory / "ensemble.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta


def signature(input_shape):
    """Signature from shapes only (never from rows). The input is not declared as a tensor spec, which MLflow
    would enforce strictly (float32 only, rejecting float64 arrays and DataFrames); `SisaPyfunc.predict`
    checks it instead, as `SisaEnsemble.predict` does. Its shape is recorded in the model's metadata."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=ParamSchema([ParamSpec("proba", "boolean", False)]),
    )


def requirements() -> list[str]:
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def save(ens, manifest: dict, path: Path, mlflow_model=None) -> dict:
    """Save the manifest's ensemble as a pyfunc model directory at ``path`` (which must not exist)."""
    import mlflow.pyfunc

    work = Path(path).parent / (Path(path).name + ".src")
    meta = export(ens, manifest, work / ARTIFACT)
    loader = work / "sisa_ensemble.py"
    loader.write_text(LOADER)
    with _quiet():
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(loader),
            artifacts={ARTIFACT: str(work / ARTIFACT)},
            signature=signature(meta["input_shape"]),
            pip_requirements=requirements(),
            mlflow_model=mlflow_model,
        )
    return meta


@contextlib.contextmanager
def _quiet():
    """No 'Downloading artifacts' progress bar for copying our own two files, and no warning that no input
    example was given: none is, on purpose (an example would be real rows)."""
    import os
    import warnings

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _pyfunc_base():
    from mlflow.pyfunc import PythonModel

    return PythonModel


class SisaPyfunc(_pyfunc_base()):
    """pyfunc wrapper: the same Aggregator over the same sub-models as `SisaEnsemble.predict`."""

    def load_context(self, context):
        from shards.models import build_module
        from sisa.aggregate import Aggregator

        root = Path(context.artifacts[ARTIFACT])
        meta = json.loads((root / "ensemble.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{root} holds a sisa ensemble of format {meta.get('format')}, expected {FORMAT}")
        weights = torch.load(root / "weights.pt", map_location="cpu", weights_only=True)
        modules = {}
        with torch.random.fork_rng(devices=[]):
            for s in meta["shards"]:
                m = build_module(
                    meta["model"], meta["model_kwargs"], meta["optim"], meta["input_shape"], meta["num_classes"]
                )
                m.load_state_dict(weights[str(s)])
                modules[s] = m.eval()
        agg = meta["aggregation"]
        self.meta = meta
        self.aggregator = Aggregator(modules, meta["num_classes"], agg["method"], agg["weights"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # or a DataFrame
        from sisa.aggregate import decide
        from sisa.data import check_features

        X = model_input
        if hasattr(X, "to_numpy"):  # a DataFrame: one column per (flattened) feature
            X = X.to_numpy()
        X = np.asarray(X)
        shape = tuple(self.meta["input_shape"])
        if X.ndim == 2 and len(shape) > 1 and X.shape[1] == int(np.prod(shape)):
            X = X.reshape(len(X), *shape)
        proba = self.aggregator.predict_proba(check_features(X, shape))
        return proba if (params or {}).get("proba") else decide(proba)


# -- the registry: one registered model per ensemble, alias "current", purge of superseded versions ----------
ALIAS = "current"


def publish(tracker, ens, run_id: str | None = None, purge: bool = False):
    """Log the ensemble's current version (unless the ``current`` alias already points at it) and, with
    ``purge``, delete every other version of the registered model and every other logged model of this
    ensemble, artifacts included, then hard-delete their metadata where the store is our own sqlite
    file. Only ids found under this ensemble's registered model and experiment are touched.

    Returns the current ModelVersion, or None when no shard is left to serve.
    """
    client, name = tracker.client, tracker.model_name
    manifest = ens.manifest
    _ensure_registered(client, name, ens)
    keep = None
    if ens.active_shards(manifest):
        fp = fingerprint(ens, manifest)
        current = _alias(client, name)
        if current is not None and current.tags.get("sisa.fingerprint") == fp:
            keep = current
        else:
            keep = _log_version(tracker, ens, manifest, run_id, fp)
    if purge:
        purge_superseded(tracker, keep)
    return keep


def _ensure_registered(client, name: str, ens) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"sisa.ensemble": name},
            description=f"SISA ensemble `{ens.config.name}` ({ens.config.sharding.shards} shards × "
            f"{ens.config.sharding.slices} slices). Alias `{ALIAS}` is the live version; versions trained "
            "on deleted rows are purged when a deletion completes.",
        )


def _alias(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def _log_version(tracker, ens, manifest: dict, run_id: str | None, fp: str):
    import tempfile

    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    client, name = tracker.client, tracker.model_name
    active = ens.active_shards(manifest)
    lm = client.create_logged_model(
        tracker.experiment_id(),
        name=name,
        source_run_id=run_id,
        tags={"sisa.ensemble": name, "sisa.fingerprint": fp, "sisa.active_shards": ",".join(map(str, active))},
        model_type="sisa-ensemble",
    )
    if run_id is not None:
        client.log_outputs(run_id, models=[LoggedModelOutput(lm.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp:
        mm = Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id)
        save(ens, manifest, Path(tmp) / "model", mlflow_model=mm)
        client.log_model_artifacts(lm.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(lm.model_id, "READY")
    # a local sqlite registry resolves models:/ sources through the *global* tracking URI (an MLflow TODO)
    with _global_uri(tracker.uri) if _own_sqlite_store(tracker) is not None else contextlib.nullcontext():
        mv = client.create_model_version(
            name,
            source=f"models:/{lm.model_id}",
            run_id=run_id,
            tags={"sisa.fingerprint": fp},
            description=f"{len(active)} active shard(s); {ens.config.aggregation.method}",
            await_creation_for=0,
            model_id=lm.model_id,
        )
    client.set_registered_model_alias(name, ALIAS, mv.version)
    return mv


def _global_uri(uri: str):
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def purge_superseded(tracker, keep=None) -> list[str]:
    """Delete every version of this ensemble's registered model except ``keep`` and every logged model of
    this ensemble that ``keep`` does not use. Returns the purged logged-model ids."""
    client, name = tracker.client, tracker.model_name
    keep_model = _model_id(keep) if keep is not None else None
    doomed: set[str] = set()
    for v in _all(lambda tok: client.search_model_versions(f"name = '{name}'", page_token=tok)):
        if keep is not None and str(v.version) == str(keep.version):
            continue
        if _model_id(v):
            doomed.add(_model_id(v))
        for k in v.tags:  # MLflow keeps a deleted version's tags; ours go first
            client.delete_model_version_tag(name, v.version, k)
        client.delete_model_version(name, v.version)
    exp = tracker.experiment_id()
    flt = f"tags.`sisa.ensemble` = '{name}'"
    for lm in _all(lambda tok: client.search_logged_models([exp], filter_string=flt, page_token=tok)):
        doomed.add(lm.model_id)
    store = _own_sqlite_store(tracker)
    if store is not None:  # soft-deleted by an earlier, interrupted purge: still ours to finish
        for mid in store._get_deleted_logged_models():
            lm = store.get_logged_model(mid, allow_deleted=True)
            if lm.experiment_id == exp and lm.tags.get("sisa.ensemble") == name:
                doomed.add(mid)
    doomed.discard(keep_model)
    for mid in sorted(doomed):
        _purge_logged_model(tracker, store, mid)
    if store is not None and doomed:
        _vacuum(tracker)
    return sorted(doomed)


def _model_id(version) -> str | None:
    """The logged model behind a registry version (sqlite registries do not return ``model_id``)."""
    if getattr(version, "model_id", None):
        return version.model_id
    src = version.source or ""
    return src.removeprefix("models:/") if src.startswith("models:/m-") else None


def _all(page):
    out, tok = [], None
    while True:
        res = page(tok)
        out += list(res)
        tok = getattr(res, "token", None)
        if not tok:
            return out


def _own_sqlite_store(tracker):
    from sisa.tracking import sqlite_path

    if sqlite_path(tracker.uri) is None:
        return None
    store = tracker.client._tracking_client.store
    return store if hasattr(store, "_hard_delete_logged_model") else None


def _purge_logged_model(tracker, store, mid: str) -> None:
    """Artifacts first (the weights), then the entity; hard delete of the row where the store is ours.

    Not `mlflow gc`: with only --logged-model-ids it also hard-deletes every deleted run in the store."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = tracker.client
    try:
        lm = store.get_logged_model(mid, allow_deleted=True) if store is not None else client.get_logged_model(mid)
    except MlflowException:
        return
    loc = lm.artifact_location.rstrip("/")
    if loc.endswith(f"/{mid}/artifacts"):  # .../models/<id>/artifacts: remove the model's whole folder
        loc = loc.removesuffix("/artifacts")
    get_artifact_repository(loc, tracking_uri=tracker.uri).delete_artifacts()
    try:
        client.delete_logged_model(mid)
    except MlflowException:  # soft-deleted already, by an interrupted purge
        if store is None:
            raise
    if store is not None:
        store._hard_delete_logged_model(mid)


def _vacuum(tracker) -> None:
    """Rewrite our sqlite file so freed pages keep nothing of the purged rows (and fold in any WAL)."""
    import sqlite3

    from sisa.tracking import sqlite_path

    db = sqlite3.connect(sqlite_path(tracker.uri), timeout=60, isolation_level=None)
    try:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
