"""Re-checkable deletion certificates: anyone with the workdir can re-run the proof that rows were forgotten.

`verify` retrains shards from scratch (stage 1, fresh initialisation) on the live store, in a fresh Python
process, and checks that every retrained checkpoint has the deployed checkpoint's sha256 and that the final
weights are bit-identical (torch.equal). Since the retraining only read the live slice files, and the audit
checks that no id the ledger deleted is among the ids of a live slice, the deployed model provably depends
on none of the deleted rows. Besides it checks
  - every slice and checkpoint file against its manifest digest, and every checkpoint's lineage (the chain
    of its slice files' sha256s, recorded by `shards.job.lineage`) against the live slice files;
  - receipts: the HMAC signature (key derived from the workdir secret), the ledger's copy and hashed ids,
    and the chain of checkpoint digests from each receipt to the deployed checkpoints;
  - what MLflow serves (`sisa.audit.published`): ``@current`` is the deployed ensemble, its artifact files
    have the digests recorded at publish time, and no version that saw deleted rows survives.
A failure names the file path or the receipt field. The audit writes nothing into the workdir: retrained
checkpoints go to a scratch directory that is removed afterwards.

``python -m sisa.audit.certificate OUT.json`` (job on stdin) is the fresh-process worker that does the retraining.
"""

from __future__ import annotations

import hmac
import json
import time

from shards.errors import SisaError, WorkdirError
from sisa.audit.report import AuditReport, Check, sign_receipt  # noqa: F401  (sign_receipt: re-exported)
from sisa.audit.retrain import check_retrain


# -- the audit ----------------------------------------------------------------------------------------
def verify(ctx, m, receipt=None, timeout: float | None = None) -> AuditReport:
    """Audit one receipt (a Receipt or a request id), or with ``receipt=None`` the whole ensemble.

    ``m`` is the manifest the caller serves; the audit checks the committed one, read from disk under the
    workdir lock (a deletion another process finished since is what counts)."""
    from sisa.ledger import Ledger

    t0 = time.time()
    wd = ctx.workdir
    rid = getattr(receipt, "request_id", receipt)
    if receipt is not None and not isinstance(rid, str):
        raise WorkdirError("verify() needs a Receipt with a request id, a request id string, or None for --all")
    report = AuditReport(scope=f"receipt {rid}" if rid else "the whole ensemble")
    with wd.lock(what="audit"):
        manifest = ctx.read_manifest()
        if not (wd.path / "secret.key").exists():
            raise WorkdirError(f"{wd.path}/secret.key is missing: hashed ids and receipt signatures cannot be checked")
        ledger = Ledger(wd.path / "ledger.db") if (wd.path / "ledger.db").exists() else None
        requests = ledger.requests() if ledger else []
        by_id = {r["id"]: r for r in requests}
        if rid is not None and rid not in by_id:
            raise WorkdirError(f"the ledger of {wd.path} has no request {rid!r}; see `sisa status` for the deletions")
        loaded = AuditReport(scope="receipts")
        receipts = {r["id"]: _check_receipt(loaded, wd, manifest, ledger, r) for r in requests if r["state"] == "done"}
        if rid is None:
            _check_ledger(report, manifest, requests)
            shards = [s for s, sh in enumerate(manifest.shards) if sh.checkpoints]
            deleted = {h: q for q in requests for h in ledger.hashed_ids(q["id"])} if ledger else {}
        else:
            if by_id[rid]["state"] != "done":
                report.add(f"receipt {rid}", "request finished", [f"ledger state is {str(by_id[rid]['state'])!r}"])
            shards = sorted(int(s) for s in (receipts.get(rid) or {}).get("shards", {}))
            deleted = {h: by_id[rid] for h in ledger.hashed_ids(rid)}
        # the receipts that speak about these shards (a later one may have retrained a shard again)
        chain = [
            (q, r)
            for q, r in receipts.items()
            if r and (rid is None or q == rid or {int(k) for k in r.get("shards", {})} & set(shards))
        ]
        keep = {f"receipt {q}" for q, _ in chain} | {f"receipt {q}" for q in receipts if rid in (None, q)}
        report.checks += [c for c in loaded.checks if c.target in keep]
        store = ctx.storage()
        _check_live_ids(report, wd, store, manifest, deleted)
        _check_chain(report, manifest, chain, shards)
        files_ok = {s: _check_files(report, store, manifest, s) for s in shards}
        if manifest.base is not None and shards and not _check_start(report, store, manifest):
            for s in shards:  # no retrain from a start that is not the recorded one
                report.add(f"shard {s}", "retrained from scratch", ["not retrained: the shared start is damaged"])
            files_ok = dict.fromkeys(files_ok, False)
        if manifest.encoder is not None:
            _check_encoder(report, ctx, store, manifest)
        check_retrain(report, ctx, manifest, store, [s for s in shards if files_ok[s]], timeout)
        from sisa.audit.published import check_published

        check_published(report, ctx, manifest, receipts)  # what MLflow serves: @current, its files, no survivor
        for s in shards:
            report.shards[s] = all(c.ok for c in report.checks if c.target == f"shard {s}")
        report.receipts = {q: all(c.ok for c in report.checks if c.target == f"receipt {q}") for q in sorted(keep)}
        report.receipts = {k.split(" ", 1)[1]: v for k, v in report.receipts.items()}
        report.checks.sort(key=_order)
    report.seconds = time.time() - t0
    return report


def _order(c: Check):
    kind, _, name = c.target.partition(" ")
    order = {"receipt": 0, "ledger": 1, "store": 2, "shard": 3, "mlflow": 4}.get(kind, 5)
    return (order, int(name) if name.isdigit() else -1, name)


def _check_receipt(report, wd, manifest, ledger, req) -> dict | None:
    rid = req["id"]
    path = wd.path / "receipts" / f"{rid}.json"
    target = f"receipt {rid}"
    where = f"{path}"
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        report.add(target, "receipt file exists", [f"{where} is missing"])
        return None
    except json.JSONDecodeError as e:
        report.add(target, "receipt file parses", [f"{where} is not valid JSON ({e})"])
        return None
    problems = []
    sig = r.get("signature") or ""
    if not sig:
        problems.append(f"{where}: field 'signature' is missing (receipt not signed)")
    elif not hmac.compare_digest(sig, sign_receipt(wd, r)):
        problems.append(f"{where}: field 'signature' does not match the receipt's content (HMAC with the workdir key)")
    report.add(target, "signature", problems)
    problems = []
    if r.get("request_id") != rid:
        problems.append(f"{where}: field 'request_id' is {r.get('request_id')!r}")
    copy = req.get("receipt") or {}
    diff = sorted(
        k for k in set(r) | set(copy) if json.dumps(r.get(k), sort_keys=True) != json.dumps(copy.get(k), sort_keys=True)
    )
    if diff:
        problems.append(f"{where}: field(s) {', '.join(diff)} differ from the ledger's copy")
    if sorted(r.get("hashed_ids", [])) != sorted(ledger.hashed_ids(rid)):
        problems.append(f"{where}: field 'hashed_ids' differs from the ids the ledger recorded")
    if r.get("config_hash") != manifest.config_hash:
        problems.append(f"{where}: field 'config_hash' is not the ensemble's ({manifest.config_hash})")
    if rid not in manifest.applied_requests:
        problems.append(f"manifest.json: field 'applied_requests' lacks {rid}")
    report.add(target, "matches the ledger and the manifest", problems)
    return r


def _check_ledger(report, manifest, requests) -> None:
    problems = [
        f"request {q['id']} is {str(q['state'])!r}, not done: open the workdir to finish it"
        for q in requests
        if q["state"] != "done"
    ]
    known = {q["id"] for q in requests}
    problems += [
        f"manifest.json: applied request {a} is not in the ledger" for a in manifest.applied_requests if a not in known
    ]
    report.add("ledger", "every request is done and recorded in the manifest", problems)


def _check_live_ids(report, wd, store, manifest, deleted: dict) -> None:
    """No hashed id of a deleted row is among the (hashed) ids of any live slice, unless the ledger records
    its readmission (`add(readmit=...)`, a refit's) after the latest deletion that named it; no stale file
    is left."""
    from shards.store import read_slice
    from sisa.ledger import Ledger

    again = Ledger(wd.path / "ledger.db").readmissions() if (wd.path / "ledger.db").exists() else {}
    deleted = {h: q for h, q in deleted.items() if again.get(h, -1.0) < q["created"]}
    problems = []
    for sh in manifest.shards:
        for e in sh.slices:
            try:
                ids = read_slice(store, e.to_dict())["id"].tolist()
            except SisaError:
                continue  # reported by the file check of the shard
            back = [h for h in wd.hash_ids(ids) if h in deleted]
            if back:
                reqs = sorted({deleted[h]["id"] for h in back})
                problems.append(
                    f"{store.describe(e.file)} holds {len(back)} id(s) deleted by request(s) {', '.join(reqs)}"
                )
    from sisa import evalfile

    rows = evalfile.read(wd.path)
    if evalfile.has_ids(rows):
        back = [h for h in wd.hash_ids(rows["id"].tolist()) if h in deleted]
        if back:
            reqs = sorted({deleted[h]["id"] for h in back})
            problems.append(
                f"{wd.path / evalfile.NAME} holds {len(back)} id(s) deleted by request(s) {', '.join(reqs)}"
            )
    report.add("ledger", f"no deleted id ({len(deleted)} hashed) is among the live ids", problems)
    keep = manifest.referenced_files()
    stale = [store.describe(f) for f in store.listdir() if f.startswith(("data/", "ckpt/")) and f not in keep]
    report.add(
        "store",
        "no superseded slice or checkpoint file is left",
        [f"{f} is not referenced by the manifest" for f in stale],
    )


def _check_chain(report, manifest, receipts: list[tuple[str, dict]], shards: list[int]) -> None:
    """Walk the receipts in ledger order: each one's checkpoints_before / resumed_from must be what the
    previous ones left, and the last word on each stage must be the deployed checkpoint.

    Shards have their own stage counts (appended stages, ``sharding.new_rows: append``): a receipt's
    checkpoints_before cover its first stage to the shard's last stage then, and its checkpoints_after to
    the shard's last stage after it (one more for an appended stage, fewer when a deletion emptied an
    appended slice, or a new layout after a compaction)."""
    state: dict[int, dict[int, tuple]] = {s: {} for s in shards}  # stage -> (digest, rid, field)
    count: dict[int, int] = {}  # shard -> its stage count after the receipts walked so far
    lineage: dict[int, tuple] = {}  # shard -> (lineage_after, rid, field) of the last receipt retraining it
    problems: dict[str, list[str]] = {}
    for rid, r in receipts:
        for key, v in (r.get("shards") or {}).items():
            s = int(key)
            if s not in state:
                continue
            f = f"receipts/{rid}.json shards.{s}"
            p = problems.setdefault(rid, [])
            try:
                first, before, after = int(v["from_stage"]), list(v["checkpoints_before"]), list(v["checkpoints_after"])
            except (KeyError, TypeError, ValueError):
                p.append(f"{f}: fields from_stage / checkpoints_before / checkpoints_after are missing or malformed")
                continue
            last = first + len(before) - 1
            if s in count and last != count[s] and not (r.get("kind") == "compact" and first == 1):
                p.append(f"{f}.checkpoints_before ends at stage {last} but the shard had {count[s]} stages")
            count[s] = first + len(after) - 1
            state[s] = {k: v for k, v in state[s].items() if k < first or k <= count[s]}
            claims = [(first + k, d, f"{f}.checkpoints_before[{k}]") for k, d in enumerate(before)]
            if first > 1:
                claims.append((first - 1, v.get("resumed_from"), f"{f}.resumed_from"))
            for stage, digest, name in claims:
                known = state[s].get(stage)
                if known and known[0] != digest:
                    p.append(f"{name} = {str(digest)[:12]} but {known[2]} left {known[0][:12]}")
                elif not known and stage == first - 1:
                    state[s][stage] = (digest, rid, name)
            for k, d in enumerate(after):
                state[s][first + k] = (d, rid, f"{f}.checkpoints_after[{k}]")
            lineage[s] = (v.get("lineage_after"), rid, f"{f}.lineage_after")
    for s in shards:
        cks = manifest.shards[s].checkpoints
        if s in count and count[s] != len(cks):
            rid = next(
                rid
                for rid, r in reversed(receipts)
                if str(s) in (r.get("shards") or {}) or s in (r.get("shards") or {})
            )
            problems[rid].append(f"shard {s} has {len(cks)} stages deployed but its receipts leave {count[s]}")
        for stage, (digest, rid, name) in sorted(state[s].items()):
            dep = cks[stage - 1] if 0 < stage <= len(cks) else None
            if dep is None or dep.sha256 != digest:
                problems[rid].append(
                    f"{name} = {str(digest)[:12]} but the deployed stage-{stage} checkpoint "
                    + (f"{dep.file} has {dep.sha256[:12]}" if dep else "is missing")
                )
        if s in lineage and cks:
            digest, rid, name = lineage[s]
            if digest != cks[-1].lineage:
                problems[rid].append(f"{name} = {str(digest)[:12]} but the deployed checkpoint's lineage differs")
    for rid, r in receipts:
        if any(int(k) in state for k in (r.get("shards") or {})):
            report.add(f"receipt {rid}", "checkpoint digests lead to the deployed checkpoints", problems.get(rid, []))


def _check_encoder(report, ctx, store, manifest) -> None:
    """The encoder's weights match their digest and, loaded afresh, its features of the probe batch are
    those recorded at fit (`shards.encoder.probe`): a user's module whose code changed is caught."""
    from shards import encoder

    e, problems = manifest.encoder, []
    try:
        module = encoder.load(store, ctx.spec(manifest, full=True), e.file, e.sha256, e.module)
        encoder.check_probe(module, manifest.input_shape, e.probe, e.module or store.describe(e.file))
    except SisaError as err:
        problems.append(str(err).split(";")[0])
    name = e.module or "the start's body"
    report.add("encoder", f"the encoder ({name}) matches the manifest digest and behaves as at fit", problems)


def _check_start(report, store, manifest) -> bool:
    """The shared start (`shards.base`) and its base rows file match their digests; the start's lineage is
    the digest of the ``model.init`` file and the base rows it was made of."""
    from shards import base as startmod
    from shards import training

    b, problems = manifest.base, []
    report.start = {"sha256": b.sha256, "lineage": b.lineage, "rows": b.rows, "init_sha256": b.init_sha256}
    try:
        ckpt = training.load_checkpoint(store.read(b.file, b.sha256), store.describe(b.file))
        if b.rows_file is not None:
            store.read(b.rows_file.file, b.rows_file.sha256)
        want = startmod.start_lineage(b.init_sha256, b.rows_file.sha256 if b.rows_file else None)
        if ckpt.get("lineage") != b.lineage or b.lineage != want:
            problems.append(f"{store.describe(b.file)}: lineage is not the digest of model.init and the base rows")
        e = manifest.encoder  # model.encoder: the start the encoder is the body of (shards.encoder)
        body = e is not None and e.module is None
        if body and training.load_checkpoint(store.read(e.file, e.sha256)).get("lineage") != b.lineage:
            problems.append(f"{store.describe(e.file)}: the encoder's lineage is not the start's")
    except SisaError as err:
        problems.append(str(err).split(";")[0])
    report.add("base", "the shared start and base rows match the manifest digests", problems)
    return not problems


def _check_files(report, store, manifest, s: int) -> bool:
    """Every slice and checkpoint file of shard s matches its digest; checkpoint lineage and row counts
    match the live slice files."""
    from shards import training
    from shards.job import lineage

    sh = manifest.shards[s]
    slices = [e.to_dict() for e in sh.slices]
    problems = []
    for e in sh.slices:
        try:
            store.read(e.file, e.sha256)
        except SisaError as err:
            problems.append(str(err).split(";")[0])
    report.add(f"shard {s}", "slice files match the manifest digests", problems)
    files_ok = not problems
    problems, lin = [], []
    for k, c in enumerate(sh.checkpoints):
        where = store.describe(c.file)
        try:
            ckpt = training.load_checkpoint(store.read(c.file, c.sha256), where)
        except SisaError as err:
            problems.append(str(err).split(";")[0])
            continue
        want = lineage(slices, k + 1, manifest.base.sha256 if manifest.base else None)
        if c.lineage != want:
            lin.append(
                f"manifest.json shards.{s}.checkpoints[{k}].lineage is not the digest of the live slices 1..{k + 1}"
            )
        if ckpt.get("lineage") != c.lineage:
            lin.append(f"{where}: the lineage inside the checkpoint differs from the manifest's")
        if c.rows != sum(e.rows for e in sh.slices[: k + 1]):
            lin.append(f"manifest.json shards.{s}.checkpoints[{k}].rows does not match the live slices")
    report.add(f"shard {s}", "checkpoint files match the manifest digests", problems)
    report.add(f"shard {s}", "checkpoint lineage = digest of the live slice files", lin)
    return files_ok  # the retraining needs sound slice files only
