"""A deletion removes exactly the rows it names, through every entry point (API, CLI, CSV id columns)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config, tiny_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.errors import DataError
from shards.store import read_slice
from sisa import SisaEnsemble

CFG = tiny_config(sharding={"shards": 2, "slices": 2}, training={"epochs": 1}, data={"test_fraction": 0.0})


def live_ids(ens) -> list:
    store = ens.storage()
    return [i for sh in ens.manifest["shards"] for e in sh["slices"] for i in read_slice(store, e)["id"].tolist()]


def fitted(path, ids, cfg=CFG):
    X, y, _ = tiny_data(n=len(ids))
    return SisaEnsemble.from_config(cfg, path).fit(X, y, ids=ids)


def unchanged(ens):
    manifest = (ens.workdir.path / "manifest.json").read_bytes()
    return lambda: (ens.workdir.path / "manifest.json").read_bytes() == manifest


@pytest.fixture(scope="module")
def int_ens(tmp_path_factory):
    return fitted(tmp_path_factory.mktemp("ints") / "w", np.arange(40, 80))


def test_bytes_id_never_names_its_byte_values(int_ens):
    same = unchanged(int_ens)
    with pytest.raises(DataError, match="ids are str but this ensemble's ids are int"):
        int_ens.delete(b"12")  # used to delete ids 49 and 50, the byte values of "1" and "2"
    with pytest.raises(DataError, match="ids are str but this ensemble's ids are int"):
        int_ens.estimate_deletion_cost([b"49"])
    assert same() and sorted(live_ids(int_ens)) == list(range(40, 80))


def test_shard_of_refuses_an_id_of_the_other_kind(int_ens):
    with pytest.raises(DataError, match="ids are str but this ensemble's ids are int"):
        int_ens.shard_of("7")
    with pytest.raises(DataError, match="one id"):
        int_ens.shard_of([41, 42])
    assert int_ens.shard_of(np.int64(41)) == int_ens.shard_of(41) == int_ens.shard_of(np.array(41))


def test_numpy_scalars_name_one_id(tmp_path):
    ens = fitted(tmp_path / "w", np.arange(100, 140))
    assert ens.estimate_deletion_cost(np.int64(105)).rows == 1
    r = ens.delete(np.int64(105))
    assert r.rows_deleted == 1 and 105 not in live_ids(ens) and len(live_ids(ens)) == 39
    s = fitted(tmp_path / "s", np.array([f"u{i}" for i in range(40)]))
    assert s.delete(np.str_("u3")).rows_deleted == 1 and s.delete(np.array("u4")).rows_deleted == 1
    assert s.delete(b"u5").rows_deleted == 1  # bytes from a database driver: the id "u5"
    assert sorted(set(map(str, range(40))) - {i[1:] for i in live_ids(s)}) == ["3", "4", "5"]


def test_overlong_and_malformed_ids_are_refused_at_fit_and_nothing_is_written(tmp_path):
    ids = np.array([f"u{i}" for i in range(39)] + ["x" * 20000], dtype=object)
    with pytest.raises(DataError, match="at most 256 characters"):
        fitted(tmp_path / "w", ids)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.npy"))
    with pytest.raises(DataError, match="mix types"):
        fitted(tmp_path / "w2", [*range(39), "a"])


ID_SETS = st.one_of(
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=12, max_size=24, unique=True),
    st.lists(
        st.sampled_from(["alice", "alice ", " alice", "Alice", "ALICE", "07", "7", "٣", "3", "a\nb", "a b", "é", "é"])
        | st.text(min_size=1, max_size=6).filter(lambda t: "\x00" not in t and not any(0xD800 <= ord(c) < 0xE000 for c in t)),
        min_size=12,
        max_size=24,
        unique=True,
    ),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ID_SETS, st.data())
def test_exactly_the_named_rows_go(ids, data):
    """For random id sets of every kind (near-duplicates included) and random requests, exactly the named
    rows leave the store, and the survivors' features are untouched."""
    request = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4, unique=True))
    with tempfile.TemporaryDirectory() as d:
        ens = fitted(Path(d) / "w", np.array(ids, dtype=object))
        before = {i: x.tobytes() for sh in ens.manifest["shards"] for e in sh["slices"]
                  for i, x in zip(read_slice(ens.storage(), e)["id"].tolist(), read_slice(ens.storage(), e)["x"])}
        receipt = ens.delete(request)
        after = live_ids(ens)
        assert receipt.rows_deleted == len(request)
        assert sorted(after, key=repr) == sorted(set(ids) - set(request), key=repr)
        assert all(type(i) is type(ids[0]) for i in after)
        for sh in ens.manifest["shards"]:
            for e in sh["slices"]:
                rows = read_slice(ens.storage(), e)
                assert all(before[i] == x.tobytes() for i, x in zip(rows["id"].tolist(), rows["x"]))


def sisa(*args, check=True, stdin=None):
    out = subprocess.run(
        [sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True, input=stdin
    )
    if check and out.returncode != 0:
        raise AssertionError(out.stdout + out.stderr)
    return out


def test_cli_ids_file_keeps_whitespace_and_json_carries_any_id(tmp_path):
    names = ["alice", "alice ", "bob", "carol\nnewline", "dave"] + [f"u{i}" for i in range(35)]
    ens = fitted(tmp_path / "w", np.array(names, dtype=object))
    wd = ens.workdir.path
    (tmp_path / "ids.txt").write_text("alice \n")
    out = sisa("delete", "--workdir", wd, "--executor", "inprocess", "--ids-file", tmp_path / "ids.txt").stdout
    assert "1 row(s) deleted" in out
    ens = SisaEnsemble.open(wd, executor="inprocess")
    assert "alice" in live_ids(ens) and "alice " not in live_ids(ens)
    (tmp_path / "ids.json").write_text(json.dumps(["carol\nnewline"]))
    sisa("delete", "--workdir", wd, "--executor", "inprocess", "--ids-file", tmp_path / "ids.json", "--ids-format", "json")
    sisa("delete", "--workdir", wd, "--executor", "inprocess", "--ids-file", "-", "--ids-format", "nul", stdin="bob\x00")
    ens = SisaEnsemble.open(wd, executor="inprocess")
    assert {"alice", "dave"} <= set(live_ids(ens)) and not {"bob", "carol\nnewline"} & set(live_ids(ens))
    assert "--ids-format json" in sisa("delete", "--help").stdout


@pytest.mark.parametrize("text", ["07", "٣", "²", "+41", " 41"])
def test_cli_int_ids_must_be_canonical_decimal(int_ens, text):
    same = unchanged(int_ens)
    res = sisa("delete", "--workdir", int_ens.workdir.path, "--executor", "inprocess", text, check=False)
    assert res.returncode == 2 and "not an int id" in res.stderr and "Traceback" not in res.stderr
    assert same()


def test_csv_id_column_keeps_leading_zeros(tmp_path):
    X, y, _ = tiny_data(n=40)
    ids = ["007", "7"] + [str(i) for i in range(100, 138)]
    rows = ["id,label," + ",".join(f"f{k}" for k in range(X.shape[1]))]
    rows += [f"{i},{lab}," + ",".join(map(repr, map(float, x))) for i, lab, x in zip(ids, y, X)]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "d.csv").write_text("\n".join(rows) + "\n")
    cfg = {**CFG, "data": {"source": "csv", "path": "d.csv", "test_fraction": 0.0}}
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit()
    assert ens.manifest["id_kind"] == "str" and {"007", "7"} <= set(live_ids(ens))
    assert ens.delete("7").rows_deleted == 1
    assert "007" in live_ids(ens) and "7" not in live_ids(ens)


def test_a_one_row_slice_with_odd_width_ids_trains():
    """Found by the property test: a one-row field view of a (U1, i8, f4[6]) record counts as contiguous
    with the record's 36-byte stride, which torch refuses."""
    from shards import training
    from shards.spec import TrainSpec

    rows = np.zeros(1, dtype=[("id", "<U1"), ("y", "<i8"), ("x", "<f4", (6,))])
    rows["id"], rows["y"], rows["x"] = "0", 1, np.arange(6, dtype=np.float32)
    spec = TrainSpec(
        seed=0, model="mlp", model_kwargs={"hidden": [4]}, optim={"optimizer": "adam", "lr": 0.01},
        epochs_per_stage=(1,), batch_size=4, input_shape=(6,), num_classes=2, threads=1, accelerator="cpu",
    )
    ckpt, metrics = training.run_stage(spec, 0, 1, None, rows, "lineage")
    assert metrics["rows"] == 1 and metrics["epochs"]
