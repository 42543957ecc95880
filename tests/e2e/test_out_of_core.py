"""Fitting from Parquet out of core: the same slice files and weights as fitting from arrays, bad data
rejected with nothing changed, and a fit whose driver cannot hold the dataset in memory."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, tiny_config, tiny_data, weights_equal

from shards.ingest import ingest_parquet
from shards.partition import holdout_mask
from shards.storage import Storage
from sisa import SisaEnsemble
from sisa.errors import DataError, WorkdirError


def table(X, y, ids, **extra):
    cols = {"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y, **extra}
    return pa.table(cols)


def slice_entries(ens):
    return [[(e["file"], e["sha256"], e["rows"]) for e in sh["slices"]] for sh in ens.manifest["shards"]]


@pytest.mark.parametrize("str_ids", [True, False], ids=["str-ids", "int-ids"])
def test_parquet_fit_equals_array_fit(tmp_path, str_ids):
    X, y, ids = tiny_data(n=300, str_ids=str_ids)
    cfg = tiny_config(data={"source": "parquet", "path": "in/train", "test_fraction": 0.25})
    wd = tmp_path / "pq"
    (wd / "in" / "train").mkdir(parents=True)
    # a dataset directory of two files with several row groups each, and a stray non-Parquet file
    pq.write_table(table(X[:170], y[:170], ids[:170]), wd / "in" / "train" / "part-0.parquet", row_group_size=40)
    pq.write_table(table(X[170:], y[170:], ids[170:]), wd / "in" / "train" / "part-1.parquet", row_group_size=50)
    (wd / "in" / "train" / "_SUCCESS").write_text("")
    a = SisaEnsemble.from_config(cfg, wd).fit()

    held = holdout_mask(ids, cfg["seed"], 0.25)
    b = SisaEnsemble.from_config(tiny_config(), tmp_path / "arrays").fit(
        X[~held], y[~held], ids=ids[~held], eval_set=(X[held], y[held], ids[held])
    )
    assert slice_entries(a) == slice_entries(b), "same slice files, byte for byte"
    assert weights_equal(a, b)
    assert a.manifest["id_kind"] == b.manifest["id_kind"] and a.manifest["input_shape"] == [X.shape[1]]
    ea, eb = np.load(wd / "eval.npy"), np.load(tmp_path / "arrays" / "eval.npy")
    assert ea.dtype == eb.dtype and np.array_equal(ea, eb), "the same held-out rows, in the same order"
    assert not list(wd.glob(".ingest-*")) and not (wd / ".eval-ingest.npy").exists(), "spill files are removed"

    # deletion after a Parquet fit is exact as well
    gone = [ids[~held][0], ids[~held][7]]
    a.delete(gone)
    keep = ~held & ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(a, ref)


def test_fit_takes_a_parquet_path_argument(tmp_path):
    X, y, ids = tiny_data(n=200)
    src = tmp_path / "train.parquet"  # outside the workdir: a path given in code is used as given
    pq.write_table(table(X, y, ids), src)
    a = SisaEnsemble.from_config(tiny_config(data={"test_fraction": 0.0}), tmp_path / "a").fit(str(src))
    b = SisaEnsemble.from_config(tiny_config(), tmp_path / "b").fit(X, y, ids=ids)
    assert slice_entries(a) == slice_entries(b) and weights_equal(a, b)
    with pytest.raises(DataError, match="do not also pass y"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "c").fit(src, y)


def test_a_killed_fits_spill_is_wiped_by_the_next_fit(tmp_path):
    X, y, ids = tiny_data(n=120)
    wd = tmp_path / "w"
    stale = wd / ".ingest-killed"
    stale.mkdir(parents=True)
    (stale / "3.spill").write_bytes(X[5].tobytes() * 3)
    pq.write_table(table(X, y, ids), tmp_path / "t.parquet")
    SisaEnsemble.from_config(tiny_config(), wd).fit(tmp_path / "t.parquet")
    assert not stale.exists() and not list(wd.glob(".ingest-*"))


def test_big_row_groups_are_read_a_column_at_a_time_with_the_same_result(tmp_path):
    X, y, ids = tiny_data(n=400, features=5)
    src = tmp_path / "one-row-group.parquet"
    # mixed feature types: the column-at-a-time path must combine them like np.column_stack
    t = table(X, y, ids).set_column(1, "f0", pa.array(X[:, 0].astype(np.float64)))
    t = t.set_column(2, "f1", pa.array((X[:, 1] * 100).astype(np.int32)))
    pq.write_table(t, src, row_group_size=400)
    kw = dict(seed=5, shards=3, slices=4, test_fraction=0.2, spill_dir=str(tmp_path))
    whole = ingest_parquet(str(src), Storage(str(tmp_path / "s1")), eval_path=str(tmp_path / "e1.npy"), **kw)
    cols = ingest_parquet(
        str(src), Storage(str(tmp_path / "s2")), eval_path=str(tmp_path / "e2.npy"), row_group_budget=0, **kw
    )
    small = ingest_parquet(
        str(src), Storage(str(tmp_path / "s3")), eval_path=str(tmp_path / "e3.npy"), batch_bytes=1000, **kw
    )
    assert whole.slices == cols.slices == small.slices
    assert (
        (tmp_path / "e1.npy").read_bytes() == (tmp_path / "e2.npy").read_bytes() == (tmp_path / "e3.npy").read_bytes()
    )
    assert whole.rows + whole.eval_rows == 400 and whole.input_shape == [5]


BAD = {
    "dup-ids-across-files": (lambda X, y, ids: [(X, y, ids), (X[:3], y[:3], ids[:3])], "ids must be unique"),
    "nan": (lambda X, y, ids: [(np.where(np.arange(len(X))[:, None] == 7, np.nan, X), y, ids)], "NaN or inf"),
    "negative-label": (lambda X, y, ids: [(X, -y - 1, ids)], "integer class indices"),
    "too-few": (lambda X, y, ids: [(X[:5], y[:5], ids[:5])], "fewer than shards x slices"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_parquet_is_rejected_and_nothing_is_written(tmp_path, name):
    X, y, ids = tiny_data(n=120)
    wd = tmp_path / "w"
    (wd / "d").mkdir(parents=True)
    for k, part in enumerate(BAD[name][0](X, y, ids)):
        pq.write_table(table(*part), wd / "d" / f"p{k}.parquet")
    with pytest.raises(DataError, match=BAD[name][1]):
        SisaEnsemble.from_config(tiny_config(data={"source": "parquet", "path": "d"}), wd).fit()
    assert not (wd / "manifest.json").exists()
    assert not any(p.is_file() for p in (wd / "store").rglob("*")) if (wd / "store").exists() else True
    assert not list(wd.glob(".ingest-*")) and not (wd / ".eval-ingest.npy").exists()


def test_schema_problems_name_the_setting_to_change(tmp_path):
    X, y, ids = tiny_data(n=60)
    p = tmp_path / "t.parquet"
    pq.write_table(table(X, y, ids).rename_columns(["user", *[f"f{k}" for k in range(6)], "label"]), p)
    with pytest.raises(DataError, match="no column 'id'.*set data.id_column"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(p)
    pq.write_table(table(X, y, ids, note=pa.array(["x"] * 60)), p)
    with pytest.raises(DataError, match="feature column 'note' has type string"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(p)
    with pytest.raises(DataError, match="does not exist"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(tmp_path / "missing.parquet")


def test_overwrite_with_bad_parquet_leaves_the_trained_ensemble_intact(tmp_path):
    X, y, ids = tiny_data(n=200)
    wd = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(), wd).fit(X, y, ids=ids)
    before = (wd / "manifest.json").read_bytes(), ens.predict_proba(X)
    files = sorted(p for p in (wd / "store").rglob("*") if p.is_file())
    bad = tmp_path / "bad.parquet"
    pq.write_table(table(X[:150], y[:150], np.concatenate([ids[:149], ids[:1]])), bad)
    with pytest.raises(DataError, match="ids must be unique"):
        SisaEnsemble.from_config(tiny_config(), wd).fit(bad, overwrite=True)
    assert (wd / "manifest.json").read_bytes() == before[0]
    assert sorted(p for p in (wd / "store").rglob("*") if p.is_file()) == files
    assert np.array_equal(SisaEnsemble.open(wd).predict_proba(X), before[1])
    with pytest.raises(WorkdirError, match="already holds a trained ensemble"):
        SisaEnsemble.from_config(tiny_config(), wd).fit(bad)


# The driver process below starts its own Ray (workers are Ray's processes, not capped), warms up with a
# small fit through the same path, then caps its data segment (RLIMIT_DATA: heap and private anonymous
# mappings) at its current size plus HEADROOM, which is well below the dataset's size. The allocator
# settings make freed memory go back to the OS, so the cap measures live memory.
CHILD = textwrap.dedent(
    """
    import faulthandler, json, resource, sys, time
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck run shows where it stuck
    args = json.loads(sys.argv[1])
    import ray
    import pyarrow.parquet as pq
    from sisa import SisaEnsemble

    def vmdata():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ooc-test")
    SisaEnsemble.from_config(args["config"], args["warm"]).fit()
    base = vmdata()
    resource.setrlimit(resource.RLIMIT_DATA, (base + args["headroom"], resource.RLIM_INFINITY))
    out = {"base": base}
    t = time.time()
    ens = SisaEnsemble.from_config(args["config"], args["workdir"]).fit()
    out.update(fit_seconds=time.time() - t, growth=vmdata() - base, accuracy=ens.manifest["metrics"]["ensemble_accuracy"])
    out["rows"] = sum(e["rows"] for sh in ens.manifest["shards"] for e in sh["slices"])
    try:  # the control: merely reading the dataset into memory does not fit under the cap
        pq.ParquetFile(args["data"], pre_buffer=False).read(use_threads=False)
        out["control"] = "loaded"
    except MemoryError:
        out["control"] = "MemoryError"
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_fit_a_dataset_larger_than_the_drivers_memory_cap(tmp_path):
    n, f = 100_000, 400  # 160 MB of float32 features, in ONE row group (the worst case for a reader)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, f), dtype=np.float32)
    y = (X @ rng.standard_normal((f, 3)).astype(np.float32)).argmax(1)
    wd, warm = tmp_path / "big", tmp_path / "warm"
    for d, rows in ((wd, n), (warm, 2000)):
        d.mkdir()
        t = pa.table({"id": np.arange(rows), "label": y[:rows], **{f"f{k}": X[:rows, k] for k in range(f)}})
        pq.write_table(t, d / "train.parquet", row_group_size=rows, compression="none", use_dictionary=False)
    dataset_bytes = X.nbytes
    del X, t
    headroom = 64 << 20  # 40% of the dataset
    cfg = tiny_config(
        data={"source": "parquet", "path": "train.parquet", "test_fraction": 0.05},
        sharding={"shards": 4, "slices": 4},
        model={"name": "mlp", "kwargs": {"hidden": [8]}},
        training={"schedule": [1, 1, 1, 1], "batch_size": 1024},
        cluster={"executor": "ray"},
    )
    args = {
        "config": cfg,
        "workdir": str(wd),
        "warm": str(warm),
        "headroom": headroom,
        "data": str(wd / "train.parquet"),
    }
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_ARENA_MAX": "2",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"capped fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = json.loads(line[7:])
    assert headroom < dataset_bytes / 2
    assert out["control"] == "MemoryError", "the cap must be too small to hold the dataset"
    assert out["rows"] > 0.9 * n and out["accuracy"] > 0.8
