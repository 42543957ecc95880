"""Parquet ingest on the Ray cluster (Ray Data, `orchestration.ingest`): the same slice files, held-out rows
and weights as the in-memory path; duplicates, corrupt files and schema changes refused with nothing changed."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from orchestration.ingest import ray_ingest
from shards.ingest import ingest_parquet
from shards.partition import holdout_mask
from shards.storage import Storage
from sisa import SisaEnsemble
from sisa.errors import DataError


def table(X, y, ids):
    return pa.table({"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y})


def write_parts(d, X, y, ids, cuts=(0, 130, 170, None), row_group_size=40):
    d.mkdir(parents=True, exist_ok=True)
    for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        pq.write_table(table(X[a:b], y[a:b], ids[a:b]), d / f"part-{k}.parquet", row_group_size=row_group_size)
    return d


def slice_entries(ens):
    return [[(e["file"], e["sha256"], e["rows"]) for e in sh["slices"]] for sh in ens.manifest["shards"]]


def snapshot(root):
    """Every file under ``root`` and its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_ray_fit_equals_array_fit(tmp_path, ray_session):
    X, y, ids = tiny_data(n=300)
    cfg = tiny_config(data={"source": "parquet", "path": "in", "test_fraction": 0.25}, cluster={"executor": "ray"})
    wd = tmp_path / "ray"
    write_parts(wd / "in", X, y, ids)
    a = SisaEnsemble.from_config(cfg, wd).fit()

    held = holdout_mask(ids, cfg["seed"], 0.25)
    b = SisaEnsemble.from_config(tiny_config(), tmp_path / "arrays").fit(
        X[~held], y[~held], ids=ids[~held], eval_set=(X[held], y[held], ids[held])
    )
    assert slice_entries(a) == slice_entries(b), "same slice files, names and digests"
    assert weights_equal(a, b)
    ea, eb = np.load(wd / "eval.npy"), np.load(tmp_path / "arrays" / "eval.npy")
    assert ea.dtype == eb.dtype and np.array_equal(ea, eb), "the same held-out rows, in the same order"
    assert not [f for f in a._ctx.storage().listdir() if "ingest-eval" in f], "the staged held-out rows are gone"
    assert not list(wd.glob(".ingest-*")), "no driver spill"


@pytest.mark.parametrize("str_ids", [False, True], ids=["int-ids", "str-ids"])
def test_ray_ingest_writes_the_files_of_the_single_process_ingest(tmp_path, ray_session, str_ids):
    X, y, ids = tiny_data(n=260, str_ids=str_ids)
    src = write_parts(tmp_path / "in", X, y, ids, cuts=(0, 1, 100, None), row_group_size=33)
    kw = dict(seed=5, shards=2, slices=4, test_fraction=0.2)
    ours = ray_ingest(str(src), Storage(str(tmp_path / "a")), eval_path=str(tmp_path / "a.npy"), **kw)
    ref = ingest_parquet(str(src), Storage(str(tmp_path / "b")), eval_path=str(tmp_path / "b.npy"), **kw)
    assert ours == ref
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_duplicate_ids_across_files_are_refused(tmp_path, ray_session):
    X, y, ids = tiny_data(n=200)
    ids = ids.copy()
    ids[150] = ids[3]  # in another file than its twin
    src = write_parts(tmp_path / "in", X, y, ids)
    with pytest.raises(DataError, match=r"ids must be unique; 1 are repeated, e.g. \['u-3'\]"):
        ray_ingest(str(src), Storage(str(tmp_path / "s")), seed=1, shards=2, slices=2, test_fraction=0.3)


def _corrupt_page(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 200] = os.urandom(200)  # a data page, the footer intact
    path.write_bytes(bytes(data))



@pytest.mark.parametrize("bad", ["not-parquet", "new-schema", "corrupt-page"])
def test_a_bad_file_is_named_and_nothing_changes(tmp_path, ray_session, bad):
    X, y, ids = tiny_data(n=240)
    cfg = tiny_config(
        data={"source": "parquet", "path": "in", "test_fraction": 0.2},
        sharding={"shards": 2, "slices": 2},
        training={"epochs": 1},
        cluster={"executor": "ray"},
    )
    wd = tmp_path / "w"
    write_parts(wd / "in", X, y, ids, cuts=(0, 120, None))
    ens = SisaEnsemble.from_config(cfg, wd).fit()
    victim = wd / "in" / "part-1.parquet"
    if bad == "not-parquet":
        victim.write_bytes(b"PAR1 this is not a parquet file")
        match = r"part-1\.parquet is not a readable Parquet file"
    elif bad == "new-schema":
        pq.write_table(table(X[120:, :4], y[120:], ids[120:]), victim)
        match = r"part-1\.parquet has columns"
    else:
        pq.write_table(table(X[120:], y[120:], ids[120:]), victim, compression="none", row_group_size=40)
        _corrupt_page(victim)
        match = r"part-1\.parquet"
    before = {k: v for k, v in snapshot(wd).items() if not k.startswith("in/")}
    with pytest.raises(DataError, match=match):
        ens.fit(overwrite=True)
    after = {k: v for k, v in snapshot(wd).items() if not k.startswith("in/")}
    assert after.keys() == before.keys() and after == before, "workdir and store as before"
