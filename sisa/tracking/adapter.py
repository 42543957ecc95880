"""The one place sisa touches MLflow below its public client API.

Erasure needs a few things MLflow's public API does not offer: the hard delete of a logged model's row
(the public delete only marks it), the list of soft-deleted logged models (an interrupted purge leaves
some), a models:/ source resolved against our own store, the artifact repository of a location, and a
version's tags deleted in one transaction. A deletion's way to *done* also calls two writes one level
below `MlflowClient` (`set_alias`, `delete_version`): the same call on the same store, without the read
the client makes first (a check that the name is a registered model, not a prompt), which
`sisa.tracking.registry` has made once already.
Each is reached here and nowhere else, so that an MLflow upgrade that moves one of them breaks this
module only. Everything is used on a ``sqlite:///`` store that belongs to the workdir (`OwnStore`);
on a tracking server the public API is all sisa uses.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for servers and other databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def local_path(location: str) -> Path | None:
    """The folder of a local (``file://`` or plain path) artifact location; None for remote stores."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def client(uri: str):
    """The public MLflow client for tracking and registry at ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def zero_on_delete(mlflow_client, uri: str) -> bool:
    """On our own ``sqlite:///`` file, make every connection of the client's SQLAlchemy engines run with
    ``secure_delete`` (sqlite zeroes a row's bytes as it deletes them, so a purge needs no VACUUM) and the
    database in WAL mode (a commit is one fsync of the log instead of a journal file created, synced and
    removed: MLflow commits some fifty times per deletion). Pooled connections are closed so that the next
    ones get both. True when every engine has it; False (a server, or MLflow moved its engines): VACUUM."""
    if sqlite_path(uri) is None:
        return False
    from sqlalchemy import event

    try:
        stores = [mlflow_client._tracking_client.store, mlflow_client._get_registry_client().store]
        engines = [e for st in stores for e in (getattr(st, "engine", None), getattr(st, "read_engine", None)) if e]
    except Exception:  # noqa: BLE001 - a moved private attribute: fall back to VACUUM
        return False
    if not engines:
        return False
    for engine in {id(e): e for e in engines}.values():
        if not event.contains(engine, "connect", _sqlite_pragmas):
            event.listen(engine, "connect", _sqlite_pragmas)
            engine.dispose()
    return True


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA secure_delete=ON")
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # persistent; refused while another process writes: then later
        except Exception:  # noqa: BLE001 - the journal mode is speed only
            pass
    finally:
        cur.close()


def global_tracking_uri(uri: str):
    """A context in which MLflow's *global* tracking URI is ``uri``: a local sqlite registry resolves a
    ``models:/`` source through it when a model version is created (an MLflow TODO)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def artifact_repository(location: str, tracking_uri: str):
    """MLflow's artifact repository for ``location`` (delete or download a model's files)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(location, tracking_uri=tracking_uri)


class OwnStore:
    """The tracking store behind a ``sqlite:///`` URI, for the purge's hard deletes."""

    def __init__(self, store):
        self._store = store

    def deleted_logged_models(self) -> list[str]:
        """Ids of the logged models that are marked deleted but whose rows are still there."""
        return list(self._store._get_deleted_logged_models())

    def get_logged_model(self, model_id: str):
        """The logged model, deleted or not (raises MlflowException when its row is gone)."""
        return self._store.get_logged_model(model_id, allow_deleted=True)

    def hard_delete_logged_model(self, model_id: str) -> None:
        """Remove the logged model's rows (params, tags, metrics) from the database."""
        self._store._hard_delete_logged_model(model_id)


def own_store(mlflow_client, uri: str) -> OwnStore | None:
    """The store of ``mlflow_client`` when ``uri`` is a sqlite file and the store can hard-delete logged
    models; None otherwise (a server: the public API only)."""
    if sqlite_path(uri) is None:
        return None
    store = mlflow_client._tracking_client.store
    needed = ("_get_deleted_logged_models", "_hard_delete_logged_model", "get_logged_model")
    return OwnStore(store) if all(hasattr(store, k) for k in needed) else None


def set_alias(mlflow_client, name: str, alias: str, version) -> None:
    """`MlflowClient.set_registered_model_alias` without its prompt check (a read of the registered model
    and every version it ever had, which grows with each deletion)."""
    _registry(mlflow_client, "set_registered_model_alias")(name, alias, version)


def delete_version(mlflow_client, name: str, version) -> None:
    """`MlflowClient.delete_model_version` without its prompt check."""
    _registry(mlflow_client, "delete_model_version")(name, version)


def _registry(mlflow_client, method: str):
    try:
        return getattr(mlflow_client._get_registry_client(), method)
    except AttributeError:  # a moved private attribute: the public API
        return getattr(mlflow_client, method)


def _registry_tables(mlflow_client, uri: str):
    """(session maker, MLflow's registry table classes) of our own ``sqlite:///`` store; None for a
    server, or where MLflow moved them (the caller uses the public API)."""
    if sqlite_path(uri) is None:
        return None
    try:
        from mlflow.store.model_registry.dbmodels import models as tables

        return mlflow_client._get_registry_client().store.ManagedSessionMaker, tables
    except Exception:  # noqa: BLE001 - a moved private attribute
        return None


def drop_version_tags(mlflow_client, uri: str, name: str, version) -> bool:
    """Delete every tag of a model version (MLflow keeps a deleted version's tags; ours hold digests and
    fingerprints) in one transaction on our own ``sqlite:///`` store. False where that is not possible
    (a server, or MLflow moved its tables): the caller deletes them one by one through the public API."""
    own = _registry_tables(mlflow_client, uri)
    if own is None:
        return False
    maker, t = own
    with maker() as session:
        session.query(t.SqlModelVersionTag).filter(
            t.SqlModelVersionTag.name == name, t.SqlModelVersionTag.version == int(version)
        ).delete()
    return True


def registered_model_tags(mlflow_client, uri: str, name: str) -> dict | None:
    """The tags of the registered model ``name`` read in one query on our own ``sqlite:///`` store; None
    when there is no such model, or the store is not ours (the caller asks the public API)."""
    own = _registry_tables(mlflow_client, uri)
    if own is None:
        return None
    maker, t = own
    with maker() as session:
        if session.query(t.SqlRegisteredModel.name).filter(t.SqlRegisteredModel.name == name).first() is None:
            return None
        tags = session.query(t.SqlRegisteredModelTag.key, t.SqlRegisteredModelTag.value)
        return dict(tags.filter(t.SqlRegisteredModelTag.name == name).all())


@contextlib.contextmanager
def quiet():
    """No 'Downloading artifacts' progress bar for copying our own two files, and no warning that no input
    example was given: none is, on purpose (an example would be real rows)."""
    with env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        yield


@contextlib.contextmanager
def env(key: str, value: str):
    """The environment variable ``key`` set to ``value`` inside, as it was after (MLflow reads switches there)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def model_id(version) -> str | None:
    """The logged model behind a registry version (sqlite registries do not return ``model_id``)."""
    if getattr(version, "model_id", None):
        return version.model_id
    src = version.source or ""
    return src.removeprefix("models:/") if src.startswith("models:/m-") else None


def all_pages(page):
    out, tok = [], None
    while True:
        res = page(tok)
        out += list(res)
        tok = getattr(res, "token", None)
        if not tok:
            return out


def download(client, tracking_uri: str, version, dst: str) -> Path:
    """Copy a registered version's model directory to ``dst`` (a local folder outside the workdir)."""
    mid = model_id(version)
    loc = client.get_logged_model(mid).artifact_location if mid else version.source
    with quiet():
        return Path(artifact_repository(loc, tracking_uri).download_artifacts("", dst))
