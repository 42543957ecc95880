"""Deletion certificates: the audit passes after real deletions and fails, saying where, after tampering
with a checkpoint, a store file, a receipt or the ledger's promise (a deleted row put back)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config, tiny_data

from orchestration import ShardPlan
from shards import training
from shards.store import read_slice, write_slice
from sisa import Receipt, SisaEnsemble
from sisa import manifest as manifests
from sisa.audit.certificate import sign_receipt
from sisa.ledger import Ledger

CFG = tiny_config(sharding={"shards": 3, "slices": 3})


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A workdir after two real deletions; the second one retrains shard 0 again (a receipt chain)."""
    X, y, ids = tiny_data(n=240)
    ens = SisaEnsemble.from_config(CFG, tmp_path_factory.mktemp("audit") / "w").fit(X, y, ids=ids)
    where = {i: ens.shard_of(i) for i in ids.tolist()}
    first = [next(i for i in ids.tolist() if where[i] == (0, 1)), next(i for i in ids.tolist() if where[i] == (2, 2))]
    second = [next(i for i in ids.tolist() if where[i] == (0, 0))]
    r1, r2 = ens.delete(first), ens.delete(second)
    return {"path": ens.workdir.path, "X": X, "y": y, "ids": ids, "gone": first + second, "receipts": [r1, r2]}


def clone(audited, tmp_path) -> SisaEnsemble:
    shutil.copytree(audited["path"], tmp_path / "w")
    return SisaEnsemble.open(tmp_path / "w", executor="inprocess", recover=False)


def failed(report) -> list[str]:
    return [f"{c.target} | {c.check} | {c.detail}" for c in report.failures()]


def test_receipts_are_signed_and_round_trip(audited):
    ens = SisaEnsemble.open(audited["path"], executor="inprocess")
    for r in audited["receipts"]:
        saved = json.loads((ens.workdir.path / "receipts" / f"{r.request_id}.json").read_text())
        assert saved["signature"] == r.signature == sign_receipt(ens.workdir, saved)
        assert Receipt.from_dict(saved) == r
        assert sign_receipt(ens.workdir, {**saved, "rows_deleted": 7}) != r.signature


def test_audit_passes_after_real_deletions(audited):
    ens = SisaEnsemble.open(audited["path"], executor="inprocess")
    r1, r2 = audited["receipts"]
    one = ens.verify(r1)
    assert one.ok, failed(one)
    assert one.shards == dict.fromkeys(r1.shards, True) == {0: True, 2: True}
    assert one.worker_pid is not None and one.worker_pid != os.getpid(), "retrained in a fresh process"
    assert set(one.receipts) == {r1.request_id, r2.request_id}, "r2 retrained shard 0 again: its chain is checked"
    whole = ens.verify()
    assert whole.ok, failed(whole)
    assert whole.shards == {0: True, 1: True, 2: True} and whole.receipts == {r1.request_id: True, r2.request_id: True}
    names = {c.check for c in whole.checks}
    assert {
        "weights retrained from scratch = deployed weights (torch.equal)",
        "retrained checkpoint digests = deployed digests",
        "checkpoint lineage = digest of the live slice files",
        "no deleted id (3 hashed) is among the live ids",
        "every request is done and recorded in the manifest",
    } <= names
    assert "PASS" in whole.text()


def test_checkpoint_overwritten_in_place_fails_and_names_the_file(audited, tmp_path):
    ens = clone(audited, tmp_path)
    c = ens.manifest["shards"][0]["checkpoints"][-1]
    path = ens.storage().path(c["file"])
    ckpt = training.load_checkpoint(open(path, "rb").read())
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][key] += 1e-3
    with open(path, "wb") as f:
        f.write(training.save_checkpoint(ckpt))
    report = ens.verify(audited["receipts"][1])
    assert not report.ok and report.shards == {0: False}
    msgs = failed(report)
    assert any(c["file"] in f and "corrupt" in f for f in msgs), msgs
    assert any(f"torch.equal) | {path}: tensor(s) {key}" in f for f in msgs), msgs


def test_checkpoint_swapped_with_a_consistent_manifest_fails_bit_for_bit(audited, tmp_path):
    ens = clone(audited, tmp_path)
    m = ens.manifest.to_dict()
    c = m["shards"][2]["checkpoints"][-1]
    store = ens.storage()
    ckpt = training.load_checkpoint(store.read(c["file"]))
    key = sorted(ckpt["state_dict"])[0]
    ckpt["state_dict"][key].view(-1)[0] += 1e-6  # one float, by a millionth
    c["sha256"] = store.write(c["file"], training.save_checkpoint(ckpt))
    ens._commit(manifests.from_dict(m))
    report = ens.verify()
    assert report.shards == {0: True, 1: True, 2: False}
    msgs = failed(report)
    assert any("torch.equal" in f and key in f for f in msgs), msgs
    assert any("stage 3: retrained checkpoint sha256" in f for f in msgs), msgs
    rid = audited["receipts"][0].request_id
    assert any(f.startswith(f"receipt {rid}") and "shards.2.checkpoints_after[0]" in f for f in msgs), msgs


def test_store_file_tampered_fails_and_names_it(audited, tmp_path):
    ens = clone(audited, tmp_path)
    e = ens.manifest["shards"][1]["slices"][2]
    path = ens.storage().path(e["file"])
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    report = ens.verify()
    assert report.shards == {0: True, 1: False, 2: True}
    assert any(e["file"] in f and "slice files" in f for f in failed(report)), failed(report)


def test_deleted_row_put_back_is_caught_even_when_retrained_consistently(audited, tmp_path):
    ens = clone(audited, tmp_path)
    X, y, ids = audited["X"], audited["y"], audited["ids"]
    back = audited["gone"][0]
    s, j = ens.shard_of(back)
    m = ens.manifest.to_dict()
    store = ens.storage()
    rows = read_slice(store, m["shards"][s]["slices"][j])
    i = int(np.flatnonzero(ids == back)[0])
    extra = np.zeros(1, dtype=rows.dtype)
    extra["id"], extra["y"], extra["x"] = back, y[i], X[i]
    m["shards"][s]["slices"][j] = write_slice(store, s, j, np.concatenate([rows, extra]))
    # a forger who also retrains the shard on the doctored store, so digests and lineage are consistent
    plan = ShardPlan(shard=s, start_stage=1, slices=m["shards"][s]["slices"])
    ens._ctx.run_plans("fit", manifests.from_dict(m), [plan])
    m["shards"][s]["checkpoints"] = plan.checkpoints
    ens._commit(manifests.from_dict(m))
    report = ens.verify()
    msgs = failed(report)
    rid = audited["receipts"][0].request_id
    assert any(
        f.startswith("ledger")
        and m["shards"][s]["slices"][j]["file"] in f
        and f"1 id(s) deleted by request(s) {rid}" in f
        for f in msgs
    ), msgs
    assert any("checkpoints_after" in f for f in msgs), "the receipts no longer lead to the deployed checkpoints"
    assert report.shards[s], "retraining alone matches: the ledger check is what catches it"


def sisa(*args):
    return subprocess.run([sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_receipt_tampered_fails_and_names_the_field(audited, tmp_path):
    ens = clone(audited, tmp_path)
    rid = audited["receipts"][0].request_id
    p = ens.workdir.path / "receipts" / f"{rid}.json"
    r = json.loads(p.read_text())
    r["rows_deleted"] = 0
    p.write_text(json.dumps(r))
    out = sisa("audit", "--workdir", ens.workdir.path, "--receipt", rid)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "field 'signature' does not match" in out.stdout
    assert "field(s) rows_deleted differ from the ledger's copy" in out.stdout
    assert "shards retrained from scratch in a fresh process" in out.stdout and "0: pass, 2: pass" in out.stdout
    assert "FAIL" in out.stdout
    usage = sisa("audit", "--workdir", audited["path"])
    assert usage.returncode == 2 and "--receipt ID" in usage.stderr


def test_missing_receipt_and_unfinished_request_fail(audited, tmp_path):
    ens = clone(audited, tmp_path)
    rid = audited["receipts"][1].request_id
    (ens.workdir.path / "receipts" / f"{rid}.json").unlink()
    pending = Ledger(ens.workdir.path / "ledger.db").record(ens.workdir.hash_ids(["u-100"]), {"slices": [[1, 0]]})
    report = ens.verify()
    msgs = failed(report)
    assert any(f"receipts/{rid}.json is missing" in f for f in msgs), msgs
    assert any(f"request {pending} is 'pending'" in f for f in msgs), msgs
    with pytest.raises(Exception, match="has no request 'nope'"):
        ens.verify("nope")


def test_a_workdir_of_torch_format_checkpoints_passes_and_a_deletion_after_the_upgrade_too(tmp_path, monkeypatch):
    """Checkpoints an older sisa wrote (torch's zip) pass the bit-for-bit audit, which retrains in today's
    format: the deployed checkpoint is compared as today's format would write it. A deletion after the
    upgrade leaves the shard's early stages in the old format and its retrained ones in the new."""
    from shards import ckptfile

    def older(ckpt):
        raise ckptfile.Unsupported("an older sisa")

    monkeypatch.setattr(ckptfile, "encode", older)
    X, y, ids = tiny_data(n=240)
    ens = SisaEnsemble.from_config(CFG, tmp_path / "w").fit(X, y, ids=ids)
    where = {i: ens.shard_of(i) for i in ids.tolist()}
    ens.delete([next(i for i in ids.tolist() if where[i] == (1, 1))])
    monkeypatch.undo()
    files = [ens.storage().read(c.file) for sh in ens.manifest.shards for c in sh.checkpoints]
    assert not any(ckptfile.is_own(d) for d in files), "every checkpoint in torch's format"
    report = ens.verify()
    assert report.ok, failed(report)
    ens.delete([next(i for i in ids.tolist() if where[i] == (0, 2))])
    files = [ens.storage().read(c.file) for c in ens.manifest.shards[0].checkpoints]
    assert [ckptfile.is_own(d) for d in files] == [False, False, True]
    report = ens.verify()
    assert report.ok, failed(report)
