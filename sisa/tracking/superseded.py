"""The purge of an ensemble's superseded MLflow models (`sisa.tracking.registry.publish` calls it): every
registered version but the kept one and every logged model it does not use go, their files first (zeroed,
except those sharing an inode with the kept version: no deleted row reached them), then their rows, hard-
deleted where the store is our own sqlite file, whose write-ahead log is then emptied."""

from __future__ import annotations

import stat
from pathlib import Path

from shards.errors import WorkdirError
from shards.storage import zero_and_remove_many
from sisa.failpoints import crashpoint
from sisa.tracking import adapter
from sisa.tracking.digest import files_under


def purge_superseded(
    tracker, keep=None, known: tuple[list, dict] | None = None, keep_dir: Path | None = None
) -> list[str]:
    """Delete every version of this ensemble's registered model except ``keep`` and every logged model of
    this ensemble that ``keep`` does not use. ``known``: the lists `doomed_of` made for ``keep``'s logged
    model (a staged version), instead of searching again, and ``keep_dir`` its local folder. Returns the
    purged logged-model ids.

    Each logged model's rows go only after its files, so that a purge killed in between still finds
    what it left."""
    client = tracker.client
    keep_model = adapter.model_id(keep) if keep is not None else None
    versions, doomed = known if known is not None else doomed_of(tracker, keep_model)
    old = [v for v in versions if keep is None or str(v.version) != str(keep.version)]
    doomed = {mid: loc for mid, loc in doomed.items() if mid != keep_model}
    store = adapter.own_store(client, tracker.uri)
    _delete_versions(tracker, old)
    found = _purge_artifacts(tracker, store, doomed, keep_model, keep_dir)
    crashpoint("before_logged_models_deleted")
    for mid in found:
        _delete_logged_model(tracker, store, mid)
    if store is not None and (doomed or tracker.zeroing):  # zeroing: a purge killed before it emptied the log
        _vacuum(tracker)
    return sorted(doomed)


def _delete_versions(tracker, versions: list) -> None:
    """Each version's tags, then the version (MLflow keeps a deleted version's row, redacted)."""
    client, name = tracker.client, tracker.model_name
    for v in versions:
        if not adapter.drop_version_tags(client, tracker.uri, name, v.version):  # MLflow keeps them: ours go first
            for k in v.tags:
                client.delete_model_version_tag(name, v.version, k)
        adapter.delete_version(client, name, v.version)


def doomed_of(tracker, keep_model: str | None) -> tuple[list, dict]:
    """(every version of the registered model, {id: artifact location, None where not known} of every
    logged model of this ensemble but ``keep_model``, soft-deleted ones that an interrupted purge left
    included)."""
    client, name = tracker.client, tracker.model_name
    versions = adapter.all_pages(lambda tok: client.search_model_versions(f"name = '{name}'", page_token=tok))
    doomed = {adapter.model_id(v): None for v in versions if adapter.model_id(v)}
    exp = tracker.experiment_id()
    flt = f"tags.`sisa.ensemble` = '{name}'"
    for lm in adapter.all_pages(lambda tok: client.search_logged_models([exp], filter_string=flt, page_token=tok)):
        doomed[lm.model_id] = lm.artifact_location
    store = adapter.own_store(client, tracker.uri)
    if store is not None:  # soft-deleted by an earlier, interrupted purge: still ours to finish
        for mid in store.deleted_logged_models():
            lm = store.get_logged_model(mid)
            if lm.experiment_id == exp and lm.tags.get("sisa.ensemble") == name:
                doomed[mid] = lm.artifact_location
    doomed.pop(keep_model, None)
    return versions, doomed


def _inodes(tracker, store, mid: str, root: Path | None = None) -> set[tuple[int, int]]:
    """(device, inode) of every file of logged model ``mid``'s local artifacts (none for a remote store);
    ``root``: its folder, known already."""
    if root is None:
        lm = store.get_logged_model(mid) if store is not None else tracker.client.get_logged_model(mid)
        root = adapter.local_path(lm.artifact_location)
    files = (f.stat() for f in (files_under(root) if root is not None else ()))
    return {(st.st_dev, st.st_ino) for st in files}


def _purge_artifacts(tracker, store, doomed: dict, keep_model: str | None, keep_dir: Path | None) -> list[str]:
    """Zero and remove the files of every logged model in ``doomed`` ({id: artifact location, None: look
    it up}); returns the ids found (those whose rows are to go)."""
    from mlflow.exceptions import MlflowException

    spare = _inodes(tracker, store, keep_model, keep_dir) if doomed and keep_model else set()
    found = []
    for mid, location in sorted(doomed.items()):
        if location is None:
            try:
                lm = store.get_logged_model(mid) if store is not None else tracker.client.get_logged_model(mid)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                continue
            location = lm.artifact_location
        loc = location.rstrip("/")
        if loc.endswith(f"/{mid}/artifacts"):  # .../models/<id>/artifacts: remove the model's whole folder
            loc = loc.removesuffix("/artifacts")
        _zero_local(loc, spare)
        adapter.artifact_repository(loc, tracker.uri).delete_artifacts()
        found.append(mid)
    return found


def _delete_logged_model(tracker, store, mid: str) -> None:
    """The entity, once its files are gone: where the store is ours its rows are hard-deleted (one
    transaction, no soft delete first), else the public delete.

    Not `mlflow gc`: with only --logged-model-ids it also hard-deletes every deleted run in the store."""
    from mlflow.exceptions import MlflowException

    if store is None:
        tracker.client.delete_logged_model(mid)
        return
    try:
        store.hard_delete_logged_model(mid)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # a locked or failing database: the request stays effective
            raise


def _zero_local(location: str, spare: set = frozenset()) -> None:
    """Zero a local artifact folder's files before MLflow removes them (as the store's files are), so the
    superseded weights are not left in free blocks; a file that is the same inode as one of the kept
    version (``spare``: a shard both hold) is only unlinked. Remote artifact stores delete objects whole."""
    root = adapter.local_path(location)
    doomed = []
    for f in files_under(root) if root is not None else []:
        st = f.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if (st.st_dev, st.st_ino) in spare:
            f.unlink()
        else:
            doomed.append(f)
    zero_and_remove_many(doomed)  # all zeroed, one sync, then removed


def empty_log(tracker) -> None:
    """Empty our sqlite store's write-ahead log (`_vacuum`), once a batch's run is logged after its purge."""
    if adapter.own_store(tracker.client, tracker.uri) is not None:
        _vacuum(tracker)


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
