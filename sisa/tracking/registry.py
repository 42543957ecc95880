"""The registry side of a published ensemble: one registered model per ensemble, alias ``current`` on the
live version, the digests recorded at publish time, and the purge of superseded versions.

`publish` logs the deployed ensemble (`sisa.tracking.pyfunc.save`) as a logged model and a registered model
version, records the sha256 of every file of it in the version's tags (``sisa.files``) and in the
workdir's signed publish record (``mlflow-model.json``, `sisa.tracking.digest`), and moves the alias.
`sisa.tracking.superseded.purge_superseded` then deletes every other version and logged model of this
ensemble, artifacts first.

In a local artifact store the model is written in place, and a shard whose checkpoint the previous
version (the one the signed record names) already holds is a hard link to that version's file, once the
linked file's sha256 is the record's (a changed or unreadable file is written afresh instead, so a planted
byte never travels into a new version); its digests come from the record, nothing is written again. The
purge zeroes every superseded file before it removes it, but those that are the same inode as a file of
the kept version (a shard both versions hold: no deleted row reached it).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from shards.storage import sync_paths
from sisa.failpoints import crashpoint
from sisa.tracking import adapter
from sisa.tracking.digest import DATA, FORMAT, META, read_record, shard_file, tree_digests, write_record
from sisa.tracking.pyfunc import export, fingerprint, link_shards, save, skeleton
from sisa.tracking.superseded import doomed_of, purge_superseded

ALIAS = "current"
PROMPT_TAG = "mlflow.prompt.is_prompt"  # mlflow.prompt.constants.IS_PROMPT_TAG_KEY


def publish(tracker, ctx, m, run_id: str | None = None, purge: bool = False, force: bool = False, staged=None):
    """Log the ensemble of manifest ``m`` (unless the ``current`` alias already points at it, with this
    format's digests and the workdir's publish record, and ``force`` is off) and, with
    ``purge``, delete every other version of the registered model and every other logged model of this
    ensemble, artifacts included, then hard-delete their metadata where the store is our own sqlite
    file. Only ids found under this ensemble's registered model and experiment are touched.
    ``staged``: what `stage` prepared while the shards retrained (the new version is finished from it).

    Returns the current ModelVersion, or None when no shard is left to serve.
    """
    client, name = tracker.client, tracker.model_name
    _ensure(tracker, ctx)
    keep = None
    if ctx.active_shards(m):
        fp = fingerprint(ctx, m)
        current = staged.current if staged is not None else _alias(client, name)  # the lock kept it since
        if not force and current is not None and _is_recorded(ctx.workdir, current, fp):
            keep = current
        elif staged is not None and not force:
            keep = _finish(tracker, ctx, m, run_id, fp, staged)
        else:
            reuse = {} if force else _reusable(tracker, ctx, m, current)
            keep = _log_version(tracker, ctx, m, run_id, fp, reuse)
    if purge:
        known = (
            staged.doomed
            if staged is not None and keep is not None and adapter.model_id(keep) == staged.model_id
            else None
        )
        purge_superseded(tracker, keep, known, staged.local if known is not None else None)
    return keep


@dataclass
class Staged:
    """A new version prepared while a deletion's shards retrain (`stage`): its logged model, its local
    folder (None on a remote store) with MLflow's files and the links of the shards not retrained
    (``present``, see `sisa.tracking.pyfunc.export`), and what the purge will delete once it is live
    (``doomed``: (versions, {logged model id: its location}) found then, and ``current``, the version
    ``current`` named: the workdir lock keeps anything new out). ``written``:
    {file: sha256} of MLflow's files as they were written, so that one changed before the version is
    registered is not published as it then is."""

    model_id: str
    artifact_location: str
    local: Path | None
    present: dict
    doomed: tuple[list, dict]
    current: object = None
    written: dict = field(default_factory=dict)


def stage(tracker, ctx, m, run_id: str | None, retrained: set[int]) -> Staged:
    """The part of the next version that does not wait for the retrained weights, written while they train:
    the logged model, MLflow's files (`sisa.tracking.pyfunc.skeleton`), hard links to the live version's
    files of the shards of ``m`` not in ``retrained`` (each hashed after linking), and the purge's list."""
    from mlflow.models import Model

    _ensure(tracker, ctx)
    current = _alias(tracker.client, tracker.model_name)
    reuse = {s: v for s, v in _reusable(tracker, ctx, m, current).items() if s not in retrained}
    lm = _create_logged_model(tracker, run_id)
    local = adapter.local_path(lm.artifact_location)
    present, written = {}, {}
    if local is not None:
        skeleton(
            local,
            Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id),
        )
        written = {k: v for k, v in tree_digests(local).items() if k != f"{DATA}/{META}"}  # export rewrites it
        present = link_shards(local / DATA, reuse, {s: m.shards[s].final.sha256 for s in reuse})
    doomed = doomed_of(tracker, lm.model_id)
    return Staged(lm.model_id, lm.artifact_location, local, present, doomed, current, written)


def _ensure(tracker, ctx) -> None:
    """The registered model exists and is no prompt, checked at every publish: between two, a user can
    delete it and register a prompt under its name, and the alias move and version delete skip MLflow's
    own check (`adapter.set_alias`). On our own store one read of its tags; else MLflow's lookup."""
    tags = adapter.registered_model_tags(tracker.client, tracker.uri, tracker.model_name)
    if tags is None or tags.get(PROMPT_TAG, "").lower() == "true":
        _ensure_registered(tracker.client, tracker.model_name, ctx.config)  # MLflow refuses a prompt


def _is_recorded(workdir, version, fp: str) -> bool:
    """The version is this fingerprint, published with digests, and the workdir's record names it."""
    if version.tags.get("sisa.fingerprint") != fp or version.tags.get("sisa.format") != str(FORMAT):
        return False  # a deletion's publish: the record is not read
    rec, _ = read_record(workdir)
    return (
        rec is not None
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


def _reusable(tracker, ctx, m, current) -> dict:
    """{shard: (weights file, its sha256, state-dict sha256)} of the @current version's local files whose
    checkpoint is the one ``m`` deploys, digests taken from the signed publish record that names it (each
    file is checked against its digest when it is linked, `sisa.tracking.pyfunc.export`)."""
    rec, _ = read_record(ctx.workdir)
    if current is None or rec is None or str(rec.get("version")) != str(current.version):
        return {}
    if rec.get("model_id") != adapter.model_id(current) or current.tags.get("sisa.format") != str(FORMAT):
        return {}
    prev = adapter.local_path(tracker.client.get_logged_model(rec["model_id"]).artifact_location)
    if prev is None:
        return {}
    out = {}
    for s in ctx.active_shards(m):
        key, sd = f"{DATA}/{shard_file(s)}", rec.get("state_dicts", {}).get(str(s))
        if rec["checkpoints"].get(str(s)) == m.shards[s].final.sha256 and key in rec["files"] and sd:
            out[s] = (prev / key, rec["files"][key], sd)
    return out


def _write_model(tracker, ctx, m, lm, run_id: str | None, reuse: dict) -> tuple[dict, dict]:
    """Save the pyfunc model into the logged model's artifacts: in place on a local store (hard links for
    ``reuse``), else through a temporary folder. Returns (ensemble.json's content, {file: sha256})."""
    import tempfile

    from mlflow.models import Model

    mm = Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id)
    local = adapter.local_path(lm.artifact_location)
    if local is not None:
        meta = save(ctx, m, local, mlflow_model=mm, reuse=reuse)
        files = tree_digests(local, {f"{DATA}/{k}": v for k, v in meta["files"].items()})
        sync_paths([str(local / f) for f in files])  # on disk before any alias can name the version
        return meta, files
    with tempfile.TemporaryDirectory() as tmp:
        meta = save(ctx, m, Path(tmp) / "model", mlflow_model=mm)
        files = tree_digests(Path(tmp) / "model", {f"{DATA}/{k}": v for k, v in meta["files"].items()})
        tracker.client.log_model_artifacts(lm.model_id, str(Path(tmp) / "model"))
    return meta, files


def _create_logged_model(tracker, run_id: str | None):
    from mlflow.entities import LoggedModelOutput

    client, name = tracker.client, tracker.model_name
    lm = client.create_logged_model(
        tracker.experiment_id(),
        name=name,
        source_run_id=run_id,
        tags={"sisa.ensemble": name, "sisa.format": str(FORMAT)},  # the digests go on the version
        model_type="sisa-ensemble",
    )
    if run_id is not None:
        client.log_outputs(run_id, models=[LoggedModelOutput(lm.model_id, step=0)])
    return lm


def _log_version(tracker, ctx, m, run_id: str | None, fp: str, reuse: dict):
    lm = _create_logged_model(tracker, run_id)
    meta, files = _write_model(tracker, ctx, m, lm, run_id, reuse)
    return _register(tracker, ctx, m, lm.model_id, run_id, fp, meta, files)


def _finish(tracker, ctx, m, run_id: str | None, fp: str, staged: Staged):
    """The staged version completed with ``m``'s weights (only the retrained shards are written) and registered."""
    from types import SimpleNamespace

    if staged.local is not None:
        meta = export(ctx, m, staged.local / DATA, present=staged.present)
        weights = {f"{DATA}/{k}": v for k, v in meta["files"].items()}
        if meta.get("mlflow_files") != staged.written:  # export hashed MLflow's files again, as it recorded them
            # one lost, changed or added while the shards retrained: log the version afresh (the purge
            # finds the staged one with the other superseded models)
            return _log_version(tracker, ctx, m, run_id, fp, _reusable(tracker, ctx, m, staged.current))
        files = tree_digests(staged.local, {**weights, **staged.written})
        sync_paths([str(staged.local / f) for f in files])  # on disk before any alias can name the version
    else:
        lm = SimpleNamespace(model_id=staged.model_id, artifact_location=staged.artifact_location)
        meta, files = _write_model(tracker, ctx, m, lm, run_id, {})
    return _register(tracker, ctx, m, staged.model_id, run_id, fp, meta, files)


def _register(tracker, ctx, m, model_id: str, run_id: str | None, fp: str, meta: dict, files: dict):
    """Seal a written logged model, register it as a version with the digests in its tags (one
    transaction), move the alias, write the workdir's signed record."""
    client, name = tracker.client, tracker.model_name
    active = ctx.active_shards(m)
    crashpoint("after_model_written")  # a logged model not yet registered: the next purge removes it
    client.finalize_logged_model(model_id, "READY")
    # a local sqlite registry resolves models:/ sources through the *global* tracking URI (an MLflow TODO)
    local = adapter.own_store(client, tracker.uri) is not None
    with adapter.global_tracking_uri(tracker.uri) if local else contextlib.nullcontext():
        mv = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags={
                "sisa.fingerprint": fp,
                "sisa.format": str(FORMAT),
                "sisa.files": json.dumps(files, sort_keys=True, separators=(",", ":")),
                "sisa.active_shards": ",".join(map(str, active)),
            },
            description=f"{len(active)} active shard(s); {ctx.config.aggregation.method}; ensemble.json sha256 "
            f"{files[f'{DATA}/{META}']}",
            await_creation_for=0,
            model_id=model_id,
        )
    adapter.set_alias(client, name, ALIAS, mv.version)
    record = {
        "registered_model": name,
        "version": str(mv.version),
        "model_id": model_id,
        "fingerprint": fp,
        "checkpoints": meta["checkpoints"],
        "state_dicts": meta["state_dicts"],
        "files": files,
    }
    write_record(ctx.workdir, record)  # written after the alias moved: a stale record makes the next publish log anew
    return mv
