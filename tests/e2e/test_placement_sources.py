"""Deletion-aware placement from every source: the streaming Parquet source (`shards.ingest`) reads
``data.risk_column`` per batch and writes the slice files of the in-memory path byte for byte, refuses bad
priors with the in-memory path's error, and never treats the prior as a feature."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from shards.ingest import ingest_parquet
from shards.partition import holdout_mask
from shards.storage import Storage
from sisa import SisaEnsemble
from sisa.errors import DataError

PLACED = {
    "late": {"shards": 3, "slices": 3, "placement": "late_slices", "risk_threshold": 0.2},
    "isolated": {"shards": 4, "slices": 2, "placement": "isolated_shards", "isolated_shards": 1},
}


def table(X, y, ids, risk):
    cols = {"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y, "p": risk}
    return pa.table(cols)


def priors(n, seed=1):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.2, 0.5, rng.random(n) * 0.05)


def entries(ens):
    """(file, sha256, rows, summed prior) of every slice."""
    return [[(e["file"], e["sha256"], e["rows"], e.get("risk")) for e in sh["slices"]] for sh in ens.manifest["shards"]]


def write_dir(wd, X, y, ids, risk):
    d = wd / "in" / "train"
    d.mkdir(parents=True)
    pq.write_table(table(X[:170], y[:170], ids[:170], risk[:170]), d / "part-0.parquet", row_group_size=40)
    pq.write_table(table(X[170:], y[170:], ids[170:], risk[170:]), d / "part-1.parquet", row_group_size=50)


@pytest.mark.parametrize("name", sorted(PLACED))
def test_streaming_parquet_fit_equals_array_fit_under_placement(tmp_path, name):
    X, y, ids = tiny_data(n=300, str_ids=(name == "late"))
    risk = priors(len(ids))
    sh = PLACED[name]
    cfg = tiny_config(
        sharding=sh, data={"source": "parquet", "path": "in/train", "test_fraction": 0.25, "risk_column": "p"}
    )
    write_dir(tmp_path / "pq", X, y, ids, risk)
    a = SisaEnsemble.from_config(cfg, tmp_path / "pq").fit()

    held = holdout_mask(ids, cfg["seed"], 0.25)
    tr = ~held
    b = SisaEnsemble.from_config(tiny_config(sharding=sh), tmp_path / "arrays").fit(
        X[tr], y[tr], ids=ids[tr], eval_set=(X[held], y[held], ids[held]), risk=risk[tr]
    )
    assert entries(a) == entries(b), "same slice files byte for byte, same summed priors"
    assert all(e[3] is not None for sh_ in entries(a) for e in sh_), "the priors are stored"
    assert a.manifest["input_shape"] == [X.shape[1]], "the prior column is not a feature"
    assert weights_equal(a, b)
    ea, eb = np.load(tmp_path / "pq" / "eval.npy"), np.load(tmp_path / "arrays" / "eval.npy")
    assert ea.dtype == eb.dtype and np.array_equal(ea, eb), "the same held-out rows, in the same order"

    # the big-row-group path (a column at a time, then batches) and tiny batches write the same files
    kw = dict(seed=cfg["seed"], shards=sh["shards"], slices=sh["slices"], test_fraction=0.25, risk_column="p")
    kw["placement"] = a._ctx.config.placement()
    for i, extra in enumerate([{"row_group_budget": 0}, {"batch_bytes": 1000}]):
        ing = ingest_parquet(str(tmp_path / "pq" / "in" / "train"), Storage(str(tmp_path / f"s{i}")), **kw, **extra)
        got = [[(e["file"], e["sha256"], e["rows"], e["risk"]) for e in sl] for sl in ing.slices]
        assert got == entries(b)

    # deletion after a streaming fit stays exact
    gone = [ids[tr][0], ids[tr][np.argmax(risk[tr])]]
    a.delete(gone)
    keep = tr & ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(sharding=sh), tmp_path / "ref").fit(
        X[keep], y[keep], ids=ids[keep], risk=risk[keep]
    )
    assert weights_equal(a, ref)


BAD = {
    "out-of-range": ([0.1] * 130 + [1.5] + [0.1] * 40 + [-0.2] * 2, None),
    "unknown-class": (["low"] * 100 + ["high", "nope"] * 30 + ["weird"] * 13, {"low": 0.01, "high": 0.4}),
    "null": ([0.1] * 150 + [None] + [0.1] * 22, None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_priors_give_the_in_memory_error(tmp_path, case):
    X, y, ids = tiny_data(n=173)
    bad, classes = BAD[case]
    sh = {**PLACED["late"], "risk_classes": classes} if classes else PLACED["late"]
    src = tmp_path / "train.parquet"
    pq.write_table(table(X, y, ids, pa.array(bad)), src, row_group_size=30)
    with pytest.raises(DataError) as mem:
        SisaEnsemble.from_config(tiny_config(sharding=sh), tmp_path / "m").fit(X, y, ids=ids, risk=bad)
    cfg = tiny_config(sharding=sh, data={"test_fraction": 0.0, "risk_column": "p"})
    with pytest.raises(DataError, match="risk") as streamed:
        SisaEnsemble.from_config(cfg, tmp_path / "s").fit(str(src))
    assert str(streamed.value) == str(mem.value)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_streaming_placement_needs_the_risk_column(tmp_path):
    X, y, ids = tiny_data(n=120)
    src = tmp_path / "train.parquet"
    pq.write_table(table(X, y, ids, priors(len(ids))), src)
    with pytest.raises(DataError, match="set data.risk_column"):
        SisaEnsemble.from_config(tiny_config(sharding=PLACED["late"]), tmp_path / "a").fit(str(src))
    with pytest.raises(DataError, match="has no column 'q' \\(data.risk_column\\)"):
        cfg = tiny_config(sharding=PLACED["late"], data={"risk_column": "q"})
        SisaEnsemble.from_config(cfg, tmp_path / "b").fit(str(src))
    with pytest.raises(DataError, match="set data.risk_column instead of passing risk"):
        SisaEnsemble.from_config(tiny_config(sharding=PLACED["late"]), tmp_path / "c").fit(str(src), risk=[0.1] * 120)


def cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_add_reads_the_priors_from_the_risk_column(tmp_path):
    import pyarrow.csv as pacsv

    from shards.partition import assign

    X, y, ids = tiny_data(n=200)
    risk = priors(len(ids))
    cfg = tiny_config(sharding=PLACED["late"], data={"risk_column": "p"})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w")
    ens.fit(table(X[:150], y[:150], ids[:150], risk[:150]), y[:150], ids=ids[:150])
    wd = ens.workdir.path
    new = table(X[150:175], y[150:175], ids[150:175], risk[150:175])
    pacsv.write_csv(new.drop_columns(["p"]), tmp_path / "bare.csv")
    out = cli("add", "--workdir", wd, "--input", tmp_path / "bare.csv", "--executor", "inprocess")
    assert out.returncode == 2 and "has no column 'p'" in out.stderr and "--risk-column NAME" in out.stderr
    bad = new.set_column(new.schema.get_field_index("p"), "p", pa.array([0.1] * 24 + [7.0]))
    pacsv.write_csv(bad, tmp_path / "bad.csv")
    out = cli("add", "--workdir", wd, "--input", tmp_path / "bad.csv", "--executor", "inprocess")
    assert out.returncode == 2 and "row 24 has 7.0" in out.stderr
    pacsv.write_csv(new, tmp_path / "new.csv")
    out = cli("add", "--workdir", wd, "--input", tmp_path / "new.csv", "--executor", "inprocess")
    assert out.returncode == 0, out.stderr
    # a Parquet input naming its prior column on the command line
    pq.write_table(table(X[175:], y[175:], ids[175:], risk[175:]).rename_columns([*new.column_names[:-1], "q"]),
                   tmp_path / "more.parquet")  # fmt: skip
    out = cli("add", "--workdir", wd, "--input", tmp_path / "more.parquet", "--risk-column", "q", "--dry-run")
    assert out.returncode == 0, out.stderr
    out = cli("add", "--workdir", wd, "--input", tmp_path / "more.parquet", "--executor", "inprocess")
    assert out.returncode == 2 and "has no column 'p'" in out.stderr, "data.risk_column is the default"

    ens = SisaEnsemble.open(wd, executor="inprocess")
    got = {}
    for s, sh in enumerate(ens.manifest.shards):
        for j, e in enumerate(sh.slices):
            rows = ens._ctx.storage().read(e.file, e.sha256)
            rows = np.load(__import__("io").BytesIO(rows))
            got.update({i: (s, j, r) for i, r in zip(rows["id"].tolist(), rows["risk"].tolist())})
    shard, sl, _ = assign(ids[:175], cfg["seed"], 3, 3, risk[:175], ens._ctx.config.placement())
    assert got == {i: (int(a), int(b), float(r)) for i, a, b, r in zip(ids[:175].tolist(), shard, sl, risk[:175])}
    assert any(r >= 0.2 for r in risk[150:175]), "the batch has likely rows, placed in the last slice"
