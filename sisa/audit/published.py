"""The audit of what MLflow serves: `check_published` adds the MLflow checks to an `AuditReport`.

- The workdir's publish record (``mlflow-model.json``) is signed with a key derived from ``secret.key``.
- ``models:/<name>@current`` is the version the record names, and that version is the deployed
  ensemble: its checkpoints are the manifest's active final checkpoints, and its state-dict digests are
  recomputed here from those checkpoint files.
- Every file of its artifact has the sha256 recorded at publish time (nothing changed, added or removed),
  and the pyfunc loads through the installed ``sisa.tracking.pyfunc`` only (`check_model_dir`).
- No other registered version, logged model or model artifact folder of this ensemble survives; one
  that holds a checkpoint a deletion superseded is named with the request whose rows it saw.

Everything is read-only: artifacts are copied to a temporary folder outside the workdir, and the sqlite
store is opened only if it exists (opening a missing one would create it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from shards.errors import SisaError
from sisa.tracking import adapter

TARGET = "mlflow"


def check_published(report, ctx, m, receipts: dict) -> None:
    """Add the MLflow checks to ``report`` (nothing when tracking is off and nothing was published)."""
    from sisa.tracking.adapter import sqlite_path
    from sisa.tracking.digest import RECORD, read_record

    wd, tracker = ctx.workdir, ctx.tracker()
    if not ctx.config.tracking.enabled and not (wd.path / RECORD).exists():
        return
    db = sqlite_path(tracker.uri)
    if db is not None and not db.exists():
        report.add(TARGET, "the registry can be read", [f"{db} is missing: no model was ever published"])
        return
    client = tracker.client
    exp = client.get_experiment_by_name(tracker.experiment)
    current = _alias(client, tracker.model_name)
    rec, problem = read_record(wd) if ctx.active_shards(m) or current else (None, None)
    if problem or rec is not None or current is not None:
        report.add(TARGET, "publish record signed with the workdir key", [problem] if problem else [])
    if ctx.active_shards(m):
        _check_current(report, ctx, m, tracker, current, rec)
    _check_survivors(report, tracker, exp, current, receipts)


def _alias(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "current")
    except MlflowException:
        return None


def _check_current(report, ctx, m, tracker, current, rec) -> None:
    from sisa.tracking.digest import state_dict_sha256
    from sisa.tracking.pyfunc import fingerprint

    name = tracker.model_name
    where = f"models:/{name}@current"
    if current is None:
        report.add(TARGET, f"{where} is the deployed ensemble", [f"{where} does not exist; publish it"])
        return
    where = f"{where} (version {current.version}, logged model {adapter.model_id(current)})"
    active = ctx.active_shards(m)
    deployed = {str(s): m.shards[s].final.sha256 for s in active}
    problems = []
    if current.tags.get("sisa.fingerprint") != fingerprint(ctx, m):
        problems.append(f"{where}: tag sisa.fingerprint is not the deployed checkpoints' fingerprint")
    if rec is not None:
        if str(rec.get("version")) != str(current.version) or rec.get("model_id") != adapter.model_id(current):
            problems.append(f"{where} is not the version mlflow-model.json records ({rec.get('version')})")
        if rec.get("checkpoints") != deployed:
            problems.append("mlflow-model.json: field 'checkpoints' is not the manifest's active final checkpoints")
        if current.tags.get("sisa.files") and json.loads(current.tags["sisa.files"]) != rec.get("files"):
            problems.append(f"{where}: tag sisa.files differs from mlflow-model.json's 'files'")
        for s in active:
            try:
                got = state_dict_sha256(_deployed_weights(ctx, m, s))
            except SisaError as e:
                problems.append(str(e).split(";")[0])
                continue
            if (rec.get("state_dicts") or {}).get(str(s)) != got:
                problems.append(f"mlflow-model.json: field 'state_dicts.{s}' is not the digest of the deployed weights")
        if m.encoder is not None and (rec.get("state_dicts") or {}).get("encoder") != _deployed_encoder(ctx, m):
            problems.append("mlflow-model.json: field 'state_dicts.encoder' is not the digest of the deployed encoder")
    report.add(TARGET, "@current is the published version of the deployed checkpoints", problems)
    if rec is not None:
        _check_artifact(report, tracker, current, rec, deployed)


def _deployed_weights(ctx, m, s: int) -> dict:
    """Shard ``s``'s deployed weights read from its checkpoint file now (not a sub-model cached earlier)."""
    import torch

    from shards import training

    store, c = ctx.storage(), m.shards[s].final
    ckpt = training.load_checkpoint(store.read(c.file, c.sha256), store.describe(c.file))
    with torch.random.fork_rng(devices=[]):
        module = training.init_module(ctx.spec(m), s)
    module.load_state_dict(ckpt["state_dict"])
    return module.state_dict()


def _deployed_encoder(ctx, m) -> str | None:
    """The digest of the encoder's tensors read from the start file now (model.encoder), or None if unreadable."""
    from shards import encoder
    from sisa.tracking.digest import state_dict_sha256

    try:
        e = m.encoder
        body = encoder.load(ctx.storage(), ctx.spec(m, full=True), e.file, e.sha256, e.module)
    except SisaError:
        return None
    return state_dict_sha256(body.state_dict())


def _check_artifact(report, tracker, current, rec: dict, deployed: dict) -> None:
    """Every file of the @current artifact = the published digests; it loads the installed sisa only."""
    from sisa.tracking.digest import WHAT_TO_DO, check_model_dir, diff_files, tree_digests

    client = tracker.client
    loc = client.get_logged_model(adapter.model_id(current)).artifact_location.removeprefix("file://")
    tmp = tempfile.mkdtemp(prefix="sisa-audit-model-")
    try:
        try:
            local = adapter.download(client, tracker.uri, current, tmp)
        except Exception as e:  # noqa: BLE001 -- any failure to read the artifact is a failed check
            report.add(TARGET, "@current artifact files = the digests recorded at publish", [f"{loc}: {e}"])
            return
        problems = diff_files(tree_digests(local), rec["files"], loc)
        report.add(TARGET, "@current artifact files = the digests recorded at publish", problems)
        problems = []
        try:
            meta, _ = check_model_dir(local)
            if meta["checkpoints"] != deployed or meta["state_dicts"] != rec.get("state_dicts"):
                problems.append(f"{loc}/data/ensemble/ensemble.json: its checkpoints are not the deployed ones")
        except SisaError as e:
            problems.append(str(e).replace(str(local), loc).replace(f" {WHAT_TO_DO}", ""))
        report.add(TARGET, "@current loads through the installed sisa.tracking.pyfunc, weights as published", problems)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_survivors(report, tracker, exp, current, receipts: dict) -> None:
    """No version, logged model or model folder of this ensemble but @current's."""

    client, name = tracker.client, tracker.model_name
    keep = adapter.model_id(current) if current is not None else None
    superseded = {
        d: rid
        for rid, r in receipts.items()
        for v in ((r or {}).get("shards") or {}).values()
        for d in (v.get("checkpoints_before") or [])[-1:]
    }
    problems = []
    try:
        versions = adapter.all_pages(lambda tok: client.search_model_versions(f"name = '{name}'", page_token=tok))
    except Exception:  # noqa: BLE001 -- no registered model yet
        versions = []
    seen = set()
    for v in versions:
        if current is not None and str(v.version) == str(current.version):
            continue
        mid = adapter.model_id(v)
        seen.add(mid)
        problems.append(f"models:/{name}/{v.version} (logged model {mid}) survives" + _saw(tracker, mid, superseded))
    if exp is not None:
        flt = f"tags.`sisa.ensemble` = '{name}'"
        for lm in adapter.all_pages(lambda tok: client.search_logged_models([exp.experiment_id], filter_string=flt, page_token=tok)):
            if lm.model_id not in seen | {keep}:
                seen.add(lm.model_id)
                problems.append(f"logged model {lm.model_id} survives" + _saw(tracker, lm.model_id, superseded))
        root = Path(exp.artifact_location.removeprefix("file://")) / "models"
        if exp.artifact_location.startswith(("file://", "/")) and root.is_dir():
            for d in sorted(root.iterdir()):
                if d.name not in seen | {keep}:
                    problems.append(f"{d} holds model artifacts of no live version" + _saw_dir(d, superseded))
    report.add(TARGET, "no other model version survives (none that saw deleted rows)", problems)


def _saw(tracker, mid: str | None, superseded: dict) -> str:
    if not mid:
        return ""
    from mlflow.exceptions import MlflowException

    try:
        loc = tracker.client.get_logged_model(mid).artifact_location
    except MlflowException:
        return ""
    return _saw_dir(Path(loc.removeprefix("file://")).parent, superseded) if loc.startswith("file://") else ""


def _saw_dir(model_dir: Path, superseded: dict) -> str:
    """Which deletion request(s) superseded a checkpoint this model folder serves."""
    try:
        meta = json.loads((model_dir / "artifacts" / "data" / "ensemble" / "ensemble.json").read_text())
        hit = sorted({superseded[d] for d in (meta.get("checkpoints") or {}).values() if d in superseded})
    except (OSError, ValueError, AttributeError):
        return ""
    return f": it serves checkpoints superseded by request(s) {', '.join(hit)} (it saw the deleted rows)" if hit else ""
