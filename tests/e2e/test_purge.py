"""After a deletion no byte of the deleted rows, and none of their raw ids, remains anywhere we wrote:
the shard store, checkpoints, the evaluation file (held-out rows are erased too), ledger, receipts,
manifest, the MLflow database and artifacts."""

import numpy as np
from helpers import scan, tiny_config, tiny_data

from sisa import SisaEnsemble


def test_no_trace_of_deleted_rows_anywhere(tmp_path):
    X, y, ids = tiny_data(n=280)
    ids = ids.astype("<U32")
    # rows whose feature bytes are easy to find: distinctive float32 values; 250 and 266 are held out
    marked = [7, 50, 51, 199, 250, 266]
    for k, r in enumerate(marked):
        X[r] = np.float32(31337.25 + k) + np.arange(X.shape[1], dtype=np.float32)
        ids[r] = f"SECRET-ID-{k}-zq"
    cfg = tiny_config(tracking={"enabled": True})
    tr, te = slice(0, 240), slice(240, 280)
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X[tr], y[tr], ids=ids[tr], eval_set=(X[te], y[te], ids[te]))
    needles = [X[r].astype(np.float32).tobytes() for r in marked] + [ids[r].encode() for r in marked]
    needles += [ids[r].encode("utf-32-le") for r in marked]  # how numpy stores str ids
    before = scan(ens.workdir.path, needles)
    assert {n for _, n in before} >= {X[r].tobytes() for r in marked}, "the scan finds the rows before deletion"
    assert any(n == ids[marked[0]].encode("utf-32-le") for _, n in before)

    receipt = ens.delete([ids[r] for r in marked])
    assert receipt.rows_deleted == 4 and receipt.eval_rows_deleted == 2
    ens.close()
    assert scan(ens.workdir.path, needles) == []
    # superseded checkpoints are gone: only files the manifest references remain in the store
    store_files = {
        str(p.relative_to(ens.workdir.path / "store")) for p in (ens.workdir.path / "store").rglob("*") if p.is_file()
    }
    referenced = {e["file"] for sh in ens.manifest["shards"] for e in sh["slices"] + sh["checkpoints"]}
    assert store_files == referenced
