"""The shared data rules (`shards.validation`), the row schema (`shards.schema`), the one atomic write and
zero-then-delete (`shards.storage`) and the one file reader (`sisa.data.read_file`).

The central property: the in-memory path (`sisa.data`) and the out-of-core Parquet path
(`shards.ingest`) give the same DataError, with the same message, for the same bad data.
"""

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import schema
from shards import validation as check
from shards.errors import DataError
from shards.ingest import ingest_parquet
from shards.storage import Storage, atomic_path, write_atomic, zero_and_remove
from sisa import data as datamod

S, R = 2, 2


def rows(n=80, str_ids=False):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n)
    ids = np.array([f"u{i}" for i in range(n)]) if str_ids else np.arange(n) * 3
    return X, y, ids


def as_table(X, y, ids, **extra):
    cols = {"id": pa.array(ids), **{f"f{k}": pa.array(X[:, k]) for k in range(X.shape[1])}, **extra}
    return pa.table({**cols, "label": y if isinstance(y, pa.Array) else pa.array(y)})


def parquet_error(tmp_path, table) -> DataError:
    """The error of the out-of-core path; batches of a few rows, so a bad row is found in a later chunk."""
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=25)
    with pytest.raises(DataError) as e:
        ingest_parquet(str(path), Storage(str(tmp_path / "store")), seed=1, shards=S, slices=R, batch_bytes=300)
    return e.value


def memory_error(tmp_path, table) -> DataError:
    """The error of the in-memory path reading the same file (`sisa.data.from_file`, then the checks)."""
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as e:
        X, y, ids, _ = datamod.from_file(path, "id", "label")
        datamod.check_training(X, y, ids, S, R)
    return e.value


def array_error(X, y, ids) -> DataError:
    with pytest.raises(DataError) as e:
        datamod.check_training(X, y, ids, S, R)
    return e.value


def test_batches_are_small_enough_that_row_numbers_cross_chunks(tmp_path):
    X, y, ids = rows()
    X[63, 2] = np.nan
    err = parquet_error(tmp_path, as_table(X, y, ids))
    assert "first at row 63" in str(err), "a chunk's rows must be numbered in the whole dataset"


CASES = {
    "nan-feature": (
        lambda X, y, ids: (np.where(np.arange(len(X))[:, None] == 57, np.inf, X), y, ids),
        "NaN or inf \\(first at row 57\\)",
    ),
    "negative-label": (
        lambda X, y, ids: (X, np.where(np.arange(len(y)) == 41, -2, y), ids),
        r"negative value \(-2 at row 41\)",
    ),
    "fractional-label": (
        lambda X, y, ids: (X, np.where(np.arange(len(y)) == 66, 0.5, y), ids),
        r"fractional .*first at row 66",
    ),
    "duplicate-ids": (
        lambda X, y, ids: (X, y, np.concatenate([ids[:-6], ids[:6]])),
        r"6 are repeated, e\.g\. \[0, 3, 6, 9, 12\]",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("str_ids", [False, True], ids=["int-ids", "str-ids"])
def test_both_paths_raise_the_same_error_for_the_same_bad_data(tmp_path, case, str_ids):
    mutate, match = CASES[case]
    X, y, ids = mutate(*rows(str_ids=str_ids))
    if str_ids and case == "duplicate-ids":
        match = r"6 are repeated, e\.g\. \['u0', 'u1', 'u2', 'u3', 'u4'\]"
    via_arrays = array_error(X, y, ids)
    via_file = memory_error(tmp_path, as_table(X, y, ids))
    via_parquet = parquet_error(tmp_path, as_table(X, y, ids))
    assert type(via_arrays) is type(via_file) is type(via_parquet) is DataError
    assert str(via_arrays) == str(via_file) == str(via_parquet)
    assert re.search(match, str(via_parquet)), str(via_parquet)


def test_repeated_ids_in_many_slices_are_reported_as_for_all_rows(tmp_path):
    """Equal ids land in one slice, so the Parquet path checks slice by slice; the report is still that of
    all rows at once (the count over every slice, the smallest repeated ids)."""
    X, y, ids = rows(n=120)
    ids = np.concatenate([ids[:-20], ids[:20]])
    assert str(parquet_error(tmp_path, as_table(X, y, ids))) == str(array_error(X, y, ids))
    assert "20 are repeated" in str(array_error(X, y, ids))


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"note": pa.array(["x"] * 80)}, "feature column 'note' has type string; every column other than"),
        ({"when": pa.array([b"x"] * 80)}, "feature column 'when' has type binary"),
        (
            {"f9": pa.array([1.0] * 70 + [None] + [1.0] * 9)},
            r"feature column 'f9' has missing values \(first at row 70\)",
        ),
    ],
    ids=["string", "binary", "missing-feature"],
)
def test_table_problems_name_the_column_on_both_paths(tmp_path, extra, match):
    table = as_table(*rows(), **extra)
    via_file, via_parquet = memory_error(tmp_path, table), parquet_error(tmp_path, table)
    assert str(via_file) == str(via_parquet)
    with pytest.raises(DataError, match=match):
        raise via_parquet
    assert str(tmp_path / "bad.parquet") in str(via_parquet), "the file is named"


def test_missing_labels_and_ids_are_the_same_error_on_both_paths(tmp_path):
    X, y, ids = rows()
    labels = pa.array([None if i == 52 else int(v) for i, v in enumerate(y)])
    table = as_table(X, labels, ids)
    assert str(memory_error(tmp_path, table)) == str(parquet_error(tmp_path, table))
    with pytest.raises(DataError, match=r"label column 'label' has missing values \(first at row 52\); every row"):
        raise parquet_error(tmp_path, table)
    table = as_table(X, y, pa.array([None if i == 9 else int(v) for i, v in enumerate(ids)]))
    assert str(memory_error(tmp_path, table)) == str(parquet_error(tmp_path, table))
    with pytest.raises(DataError, match=r"id column 'id' has missing values \(first at row 9\)"):
        raise parquet_error(tmp_path, table)


def test_column_rules():
    assert check.check_columns(["id", "a", "label", "b"], "id", "label", "t") == ["a", "b"]
    with pytest.raises(DataError, match="t has no column 'y' .*set data.label_column"):
        check.check_columns(["id", "a"], "id", "y", "t")
    with pytest.raises(DataError, match="no column 'key' .*set data.id_column .*deleted by id"):
        check.check_columns(["id", "label", "a"], "key", "label", "t")
    with pytest.raises(DataError, match="t has no feature columns besides 'id' and 'label'"):
        check.check_columns(["id", "label"], "id", "label", "t")
    with pytest.raises(DataError, match="id column 'id' has type double; ids must be integers or strings"):
        check.check_id_type(pa.schema([("id", pa.float64())]), "id")
    kinds = check.feature_dtypes(
        pa.schema([("a", pa.int8()), ("b", pa.bool_()), ("c", pa.float32())]), ["a", "b", "c"], "t"
    )
    assert kinds == [np.dtype(np.int8), np.dtype(bool), np.dtype(np.float32)]


def test_feature_rules():
    X = np.ones((5, 2), np.float64)
    out = check.check_features(X)
    assert out.dtype == np.float32 and out is not X
    with pytest.raises(DataError, match="features must be numeric, got dtype <U1"):
        check.check_features(np.array([["a"]]))
    with pytest.raises(DataError, match=r"shape \(n_rows, ...\), got \(5,\)"):
        check.check_features(np.ones(5))
    with pytest.raises(DataError, match=r"shape \(3,\) per row but the ensemble was trained on \(2,\)"):
        check.check_features(np.ones((5, 3)), input_shape=[2])
    X[3, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN or inf \(first at row 103\)") as e:
        check.check_finite(X, first_row=100)
    assert e.value.detail["rows"] == [103]


def test_label_rules():
    assert check.check_labels(np.array([0.0, 2.0]), 2).dtype == np.int64
    assert check.check_labels(np.array([1, 0], np.uint8), 2).tolist() == [1, 0]
    with pytest.raises(DataError, match="one label per row: got shape \\(1,\\) for 2 rows"):
        check.check_labels([1], 2)
    with pytest.raises(DataError, match="eval_set labels have dtype <U1; encode them as integer class indices"):
        check.check_labels(np.array(["a"]), 1, "eval_set labels")
    with pytest.raises(DataError, match=r"fractional or non-finite values \(first at row 11\)"):
        check.check_labels(np.array([1.0, np.nan]), 2, first_row=10)
    with pytest.raises(DataError, match=r"hold a negative value \(-1 at row 2\)"):
        check.check_labels(np.array([0, 1, -1, -5]), 4)


def test_id_rules():
    ids, kind = check.check_ids(["b", "a"], 2)
    assert kind == "str" and ids.tolist() == ["b", "a"]
    with pytest.raises(DataError, match="ids has 1 entries but there are 2 rows"):
        check.check_ids([1], 2)
    with pytest.raises(DataError, match="ids are floats"):  # the canonicalisation of `shards.ids`
        check.check_ids(np.array([1.0, 2.0]), 2)
    assert check.repeated_ids(np.array([3, 1, 2])) == (0, [])
    assert check.repeated_ids(np.array([3, 1, 3, 1, 2])) == (2, [1, 3])
    check.check_unique((0, []), (0, []))
    with pytest.raises(DataError, match=r"ids must be unique; 3 are repeated, e\.g\. \[1, 2, 9\]") as e:
        check.check_unique((1, [9]), (2, [1, 2]))
    assert e.value.detail["ids"] == [1, 2, 9]
    with pytest.raises(DataError, match="ids change type from int to str at row 40"):
        check.check_id_kind("str", "int", 40)


def test_row_count_rules():
    with pytest.raises(DataError, match="the dataset is empty"):
        check.check_training(np.zeros((0, 2)), [], [], S, R)
    with pytest.raises(DataError, match="the dataset d.parquet is empty"):
        check.check_not_empty(0, "d.parquet")
    with pytest.raises(DataError, match="3 rows is fewer than shards x slices = 2 x 2"):
        check.check_training(np.zeros((3, 2)), [0, 1, 0], None, S, R)
    X, y, ids, kind = check.check_training(np.zeros((4, 2)), [0, 1, 0, 1], None, S, R)
    assert kind == "int" and ids.tolist() == [0, 1, 2, 3] and y.dtype == np.int64


# -- the row schema --------------------------------------------------------------------------------
def test_row_dtype_and_the_narrow_str_id_field():
    assert schema.row_dtype("int", None, (3,)) == np.dtype([("id", "<i8"), ("y", "<i8"), ("x", "<f4", (3,))])
    assert schema.row_dtype("str", np.array(["a", "abcd"]), (2, 2))["id"] == np.dtype("<U4")
    assert schema.row_dtype("str", 7, ()) == schema.row_dtype("str", np.array(["x" * 7]), ())
    assert schema.id_dtype("str", np.array([], dtype=str)) == np.dtype("<U1")
    r = schema.make_rows(np.array(["aa", "b"], dtype="<U9"), [1, 0], np.ones((2, 3)), "str")
    assert r.dtype["id"] == np.dtype("<U2") and r["x"].dtype == np.float32
    assert schema.compact(r[1:], "str").dtype["id"] == np.dtype("<U1")
    assert schema.make_rows(None, [1], np.ones((1, 2)), None).dtype.names == ("y", "x")


def test_rows_encode_as_npy_without_pickle_and_the_in_place_header_matches():
    r = schema.make_rows(np.array(["u-1", "u-22"]), [2, 0], np.arange(6).reshape(2, 3), "str")
    data = schema.encode_rows(r)
    assert data[:6] == b"\x93NUMPY"
    back = schema.decode_rows(data)
    assert back.dtype == r.dtype and back.tobytes() == r.tobytes() and back["id"].tolist() == ["u-1", "u-22"]
    assert schema.npy_header(r.dtype, len(r)) + r.tobytes() == data
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        schema.decode_rows(buf.getvalue())


# -- the one atomic write and zero-then-delete -----------------------------------------------------
def test_write_atomic_replaces_whole_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "d" / "f.bin"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["f.bin"]
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(p) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["f.bin"], "the old file stays, the temp is gone"


def test_zero_and_remove_overwrites_the_bytes_before_unlinking(tmp_path):
    p, link = tmp_path / "rows.npy", tmp_path / "other-name"
    p.write_bytes(b"personal data" * 1000)
    os.link(p, link)  # a second name of the same inode shows what the removed name left on disk
    assert zero_and_remove(p, chunk=4096)
    assert not p.exists() and link.read_bytes() == b"\0" * 13000
    assert not zero_and_remove(p)


def test_storage_and_workdir_use_the_one_implementation(tmp_path):
    import sisa.workdir

    assert sisa.workdir.write_atomic is write_atomic
    st = Storage(str(tmp_path / "s"))
    st.write("data/a.npy", b"abc")
    os.link(tmp_path / "s" / "data" / "a.npy", tmp_path / "keep")
    st.delete("data/a.npy")
    assert (tmp_path / "keep").read_bytes() == b"\0\0\0" and st.listdir() == []


# -- the one reader of data files ------------------------------------------------------------------
def test_read_file_reads_npz_npy_and_tables_and_names_what_is_missing(tmp_path):
    X, y, ids = rows(n=10)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    np.save(tmp_path / "b.npy", X)
    pq.write_table(as_table(X, y, ids), tmp_path / "c.parquet")
    got = datamod.read_file(tmp_path / "a.npz", ("X", "y"), ("ids",))
    assert sorted(got) == ["X", "y"] and np.array_equal(got["y"], y)
    assert np.array_equal(datamod.read_file(tmp_path / "b.npy")["X"], X)
    assert datamod.read_file(tmp_path / "c.parquet").column_names[0] == "id"
    with pytest.raises(
        DataError, match=r"lacks arrays \['z'\] \(has \['X', 'y'\]\); save it with np.savez\(path, X=..., z=...\)"
    ):
        datamod.read_file(tmp_path / "a.npz", ("X", "z"))
    with pytest.raises(DataError, match=r"b.npy lacks arrays \['y'\] \(a .npy holds only X\); save it with np.savez"):
        datamod.read_file(tmp_path / "b.npy", ("X", "y"))
    with pytest.raises(DataError, match="unknown input type '.parquet'; give a .npz file"):
        datamod.read_file(tmp_path / "c.parquet", ("X", "y"), suffixes=(".npz",))
    with pytest.raises(DataError, match="data file .*nothing.npz does not exist"):
        datamod.read_file(tmp_path / "nothing.npz")


def test_the_audit_reads_rows_with_the_shared_reader(tmp_path):
    from sisa.audit.cli import read_rows

    X, y, _ = rows(n=10)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    got = read_rows(str(tmp_path / "d.npz"))
    assert np.array_equal(got[0], X) and np.array_equal(got[1], y)
    np.savez(tmp_path / "e.npz", X=X)
    with pytest.raises(
        DataError, match=r"lacks arrays \['y'\] \(has \['X'\]\); save it with np.savez\(path, X=..., y=...\)"
    ):
        read_rows(str(tmp_path / "e.npz"))
