"""`compact`: after append-placement additions and deletions, a refit into the canonical layout that equals
``fit(live rows)`` bit for bit (held-out rows unchanged), priced by `estimate_compaction_cost`, and a no-op
on a canonical ensemble. Real fits (tiny data), no mocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble, costmodel
from sisa.ledger import Ledger

CONFIGS = [
    ({"sharding": {"shards": 3, "slices": 3, "new_rows": "append"}}, True),
    ({"sharding": {"shards": 2, "slices": 4, "new_rows": "append", "append_epochs": 3}, "seed": 11}, False),
]


def _files(ens) -> list:
    return [
        ([(e.file, e.sha256) for e in sh.slices], [(c.file, c.sha256) for c in sh.checkpoints], sh.epochs)
        for sh in ens.manifest.shards
    ]


def _history(tmp_path, over, str_ids):
    """fit, two appends and deletions (a training row, an appended row, a held-out row); the live rows."""
    X, y, ids = tiny_data(n=300, str_ids=str_ids)
    ev = (X[270:], y[270:], ids[270:])
    a = SisaEnsemble.from_config(tiny_config(**over), tmp_path / "a").fit(X[:150], y[:150], ids=ids[:150], eval_set=ev)
    a.add(X[150:200], y[150:200], ids=ids[150:200])
    gone = [ids[2], ids[160], ev[2][3]]
    a.delete(gone)
    a.add(X[200:250], y[200:250], ids=ids[200:250])
    keep = ~np.isin(ids[:250], gone)
    ev_live = tuple(v[~np.isin(ev[2], gone)] for v in ev)
    return a, (X[:250][keep], y[:250][keep], ids[:250][keep]), ev_live


@pytest.mark.parametrize("over,str_ids", CONFIGS)
def test_compact_equals_fit_of_the_live_rows(tmp_path, over, str_ids):
    a, live, ev_live = _history(tmp_path, over, str_ids)
    eval_before = (a.workdir.path / "eval.npy").read_bytes()
    plan = a.estimate_compaction_cost()
    assert plan.appended_slices == 2 * a.config.sharding.shards and plan.rows == len(live[0])
    r = a.compact()
    c = SisaEnsemble.from_config(tiny_config(**over), tmp_path / "c").fit(*live[:2], ids=live[2], eval_set=ev_live)
    assert weights_equal(a, c)
    assert _files(a) == _files(c), "every slice and checkpoint, by name and digest; no shard keeps a schedule"
    assert (a.workdir.path / "eval.npy").read_bytes() == eval_before == (c.workdir.path / "eval.npy").read_bytes()
    assert np.array_equal(a.predict_proba(live[0][:30]), c.predict_proba(live[0][:30]))
    rows, eps = c.manifest.slice_rows(), c.config.epochs_per_stage()
    assert plan.sample_epochs == r.cost["sample_epochs"] == costmodel.full_cost(rows, eps)
    assert plan.expected_deletion_sample_epochs_after == pytest.approx(costmodel.expected_single(rows, eps))
    assert plan.deletion_overhead_sample_epochs > 0
    assert plan.expected_deletion_sample_epochs_before > plan.expected_deletion_sample_epochs_after
    assert r.kind == "compact" and r.hashed_ids == [] and set(r.shards) == set(range(len(rows)))
    store = {str(p.relative_to(a.workdir.path / "store")) for p in (a.workdir.path / "store").rglob("*") if p.is_file()}
    assert store == a.manifest.referenced_files(), "the superseded slices and checkpoints are purged"
    assert a.status()["compactions"] == {"done": 1, "unfinished": 0}
    assert a.verify().ok
    again = a.compact()
    assert again.request_id is None, "a canonical layout has nothing to compact"
    assert a.estimate_compaction_cost().sample_epochs == 0
    a.delete([live[2][5]])  # deletions after a compaction are exact as ever
    keep = live[2] != live[2][5]
    d = SisaEnsemble.from_config(tiny_config(**over), tmp_path / "d").fit(
        live[0][keep], live[1][keep], ids=live[2][keep], eval_set=ev_live
    )
    assert weights_equal(a, d) and _files(a) == _files(d)


def test_cli_compact_dry_run_and_run(tmp_path):
    from click.testing import CliRunner

    from sisa.cli.commands import main

    a, live, _ = _history(tmp_path, CONFIGS[0][0], True)
    wd = str(a.workdir.path)
    out = CliRunner().invoke(main, ["compact", "--workdir", wd, "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["appended_slices"] == 6 and plan["sample_epochs"] > 0
    out = CliRunner().invoke(main, ["compact", "--workdir", wd, "--dry-run"])
    assert out.exit_code == 0 and "6 appended slice(s)" in out.output
    assert [r["receipt"]["kind"] for r in Ledger(a.workdir.path / "ledger.db").requests()] == ["add", "delete", "add"]
    out = CliRunner().invoke(main, ["compact", "--workdir", wd, "--executor", "inprocess"])
    assert out.exit_code == 0, out.output
    assert "compacted 3 shard(s) into the canonical layout" in out.output
    out = CliRunner().invoke(main, ["compact", "--workdir", wd, "--executor", "inprocess"])
    assert out.exit_code == 0 and "nothing to compact" in out.output
    b = SisaEnsemble.open(wd, executor="inprocess")
    assert all(sh.epochs is None and len(sh.slices) == 3 for sh in b.manifest.shards)
