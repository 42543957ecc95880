"""The registry side of a published ensemble: one registered model per ensemble, alias ``current`` on the
live version, the digests recorded at publish time, and the purge of superseded versions.

`publish` logs the deployed ensemble (`sisa.tracking.pyfunc.save`) as a logged model and a registered model
version, records the sha256 of every file of it in the version's tags (``sisa.files``) and in the
workdir's signed publish record (``mlflow-model.json``, `sisa.tracking.digest`), and moves the alias.
`purge_superseded` then deletes every other version and logged model of this ensemble, artifacts first.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from shards.errors import WorkdirError
from shards.storage import zero_and_remove
from sisa.failpoints import crashpoint
from sisa.tracking import adapter
from sisa.tracking.digest import DATA, FORMAT, read_record, tree_digests, write_record
from sisa.tracking.pyfunc import fingerprint, save

ALIAS = "current"


def publish(tracker, ctx, m, run_id: str | None = None, purge: bool = False, force: bool = False):
    """Log the ensemble of manifest ``m`` (unless the ``current`` alias already points at it, with this
    format's digests and the workdir's publish record, and ``force`` is off) and, with
    ``purge``, delete every other version of the registered model and every other logged model of this
    ensemble, artifacts included, then hard-delete their metadata where the store is our own sqlite
    file. Only ids found under this ensemble's registered model and experiment are touched.

    Returns the current ModelVersion, or None when no shard is left to serve.
    """
    client, name = tracker.client, tracker.model_name
    if not tracker.registered:
        _ensure_registered(client, name, ctx.config)
        tracker.registered = True
    keep = None
    if ctx.active_shards(m):
        fp = fingerprint(ctx, m)
        current = _alias(client, name)
        if not force and current is not None and _is_recorded(ctx.workdir, current, fp):
            keep = current
        else:
            keep = _log_version(tracker, ctx, m, run_id, fp)
    if purge:
        purge_superseded(tracker, keep)
    return keep


def _is_recorded(workdir, version, fp: str) -> bool:
    """The version is this fingerprint, published with digests, and the workdir's record names it."""
    rec, _ = read_record(workdir)
    return (
        version.tags.get("sisa.fingerprint") == fp
        and version.tags.get("sisa.format") == str(FORMAT)
        and rec is not None
        and str(rec.get("version")) == str(version.version)
        and rec.get("fingerprint") == fp
        and json.loads(version.tags.get("sisa.files", "null")) == rec.get("files")
    )


def _ensure_registered(client, name: str, config) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"sisa.ensemble": name},
            description=f"SISA ensemble `{config.name}` ({config.sharding.shards} shards × "
            f"{config.sharding.slices} slices). Alias `{ALIAS}` is the live version; versions trained "
            "on deleted rows are purged when a deletion completes.",
        )


def _alias(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def _log_version(tracker, ctx, m, run_id: str | None, fp: str):
    import tempfile

    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    client, name = tracker.client, tracker.model_name
    active = ctx.active_shards(m)
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
        meta = save(ctx, m, Path(tmp) / "model", mlflow_model=mm)
        files = tree_digests(Path(tmp) / "model", {f"{DATA}/weights.pt": meta["files"]["weights.pt"]})
        client.log_model_artifacts(lm.model_id, str(Path(tmp) / "model"))
    digests = {"sisa.format": str(FORMAT), "sisa.files": json.dumps(files, sort_keys=True, separators=(",", ":"))}
    client.set_logged_model_tags(lm.model_id, digests)
    client.finalize_logged_model(lm.model_id, "READY")
    # a local sqlite registry resolves models:/ sources through the *global* tracking URI (an MLflow TODO)
    local = adapter.own_store(client, tracker.uri) is not None
    with adapter.global_tracking_uri(tracker.uri) if local else contextlib.nullcontext():
        mv = client.create_model_version(
            name,
            source=f"models:/{lm.model_id}",
            run_id=run_id,
            tags={"sisa.fingerprint": fp, **digests},
            description=f"{len(active)} active shard(s); {ctx.config.aggregation.method}; ensemble.json sha256 "
            f"{files['data/ensemble/ensemble.json']}, weights.pt sha256 {meta['files']['weights.pt']}",
            await_creation_for=0,
            model_id=lm.model_id,
        )
    client.set_registered_model_alias(name, ALIAS, mv.version)
    record = {
        "registered_model": name,
        "version": str(mv.version),
        "model_id": lm.model_id,
        "fingerprint": fp,
        "checkpoints": meta["checkpoints"],
        "state_dicts": meta["state_dicts"],
        "files": files,
    }
    write_record(ctx.workdir, record)  # written after the alias moved: a stale record makes the next publish log anew
    return client.get_model_version(name, mv.version)


def purge_superseded(tracker, keep=None) -> list[str]:
    """Delete every version of this ensemble's registered model except ``keep`` and every logged model of
    this ensemble that ``keep`` does not use. Returns the purged logged-model ids."""
    client, name = tracker.client, tracker.model_name
    keep_model = adapter.model_id(keep) if keep is not None else None
    doomed: set[str] = set()
    for v in adapter.all_pages(lambda tok: client.search_model_versions(f"name = '{name}'", page_token=tok)):
        if keep is not None and str(v.version) == str(keep.version):
            continue
        if adapter.model_id(v):
            doomed.add(adapter.model_id(v))
        for k in v.tags:  # MLflow keeps a deleted version's tags; ours go first
            client.delete_model_version_tag(name, v.version, k)
        client.delete_model_version(name, v.version)
    exp = tracker.experiment_id()
    flt = f"tags.`sisa.ensemble` = '{name}'"
    for lm in adapter.all_pages(lambda tok: client.search_logged_models([exp], filter_string=flt, page_token=tok)):
        doomed.add(lm.model_id)
    store = adapter.own_store(client, tracker.uri)
    if store is not None:  # soft-deleted by an earlier, interrupted purge: still ours to finish
        for mid in store.deleted_logged_models():
            lm = store.get_logged_model(mid)
            if lm.experiment_id == exp and lm.tags.get("sisa.ensemble") == name:
                doomed.add(mid)
    doomed.discard(keep_model)
    for mid in sorted(doomed):
        _purge_logged_model(tracker, store, mid)
    if store is not None and (doomed or tracker.zeroing):  # zeroing: a purge killed before it emptied the log
        _vacuum(tracker)
    return sorted(doomed)


def _purge_logged_model(tracker, store, mid: str) -> None:
    """Artifacts first (the weights), then the entity; hard delete of the row where the store is ours.

    Not `mlflow gc`: with only --logged-model-ids it also hard-deletes every deleted run in the store."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        lm = store.get_logged_model(mid) if store is not None else client.get_logged_model(mid)
    except MlflowException:
        return
    loc = lm.artifact_location.rstrip("/")
    if loc.endswith(f"/{mid}/artifacts"):  # .../models/<id>/artifacts: remove the model's whole folder
        loc = loc.removesuffix("/artifacts")
    _zero_local(loc)
    adapter.artifact_repository(loc, tracker.uri).delete_artifacts()
    try:
        client.delete_logged_model(mid)
    except MlflowException:  # soft-deleted already, by an interrupted purge
        if store is None:
            raise
    if store is not None:
        store.hard_delete_logged_model(mid)


def _zero_local(location: str) -> None:
    """Zero a local artifact folder's files before MLflow removes them (as the store's files are), so the
    superseded weights are not left in free blocks. Remote artifact stores delete objects as a whole."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return
    root = Path(unquote(parsed.path))
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        if f.is_file() and not f.is_symlink():
            zero_and_remove(f)


def _vacuum(tracker) -> None:
    """Leave nothing of the purged rows in our sqlite file. Where MLflow's connections delete with
    ``secure_delete`` (`adapter.zero_on_delete`) the freed bytes are zeros already and only the WAL, which
    still holds the pages as they were, is folded in and emptied; otherwise the file is rewritten (VACUUM)."""
    import sqlite3

    db = sqlite3.connect(adapter.sqlite_path(tracker.uri), timeout=60, isolation_level=None)
    try:
        if not tracker.zeroing:
            db.execute("VACUUM")
        crashpoint("before_mlflow_log_emptied")
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # a reader (`sisa ui`?) pins old pages in the log: not done until they are gone
            raise WorkdirError(
                f"{tracker.uri}: the purge could not empty the database's write-ahead log while another "
                "process reads it; close it (e.g. `sisa ui`) and reopen the workdir to finish the deletion"
            )
    finally:
        db.close()
