"""The typed manifest: round trip, migration of the untyped format-1 manifests of sisa 0.1, refusals."""

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.errors import WorkdirError
from sisa import manifest as manifests
from sisa.manifest import Checkpoint, Manifest, ShardState, SliceRef

FORMAT_1 = {  # what sisa 0.1 wrote (the untyped dict), trimmed to one shard
    "format": 1,
    "config_hash": "c" * 16,
    "training_hash": "t" * 16,
    "id_kind": "str",
    "input_shape": [6],
    "num_classes": 3,
    "storage": "/w/store",
    "shards": [
        {
            "slices": [{"file": "data/shard-000/slice-00-aa.npy", "sha256": "a" * 64, "rows": 5}],
            "checkpoints": [
                {"stage": 1, "file": "ckpt/shard-000/stage-01-bb.pt", "sha256": "b" * 64, "rows": 5, "lineage": "l"}
            ],
            "excluded": False,
        }
    ],
    "applied_requests": ["r1"],
    "created": 1.5,
    "metrics": {"ensemble_accuracy": 0.5},
}


def test_format_1_migrates_and_writes_back_as_the_current_format(tmp_path):
    m = manifests.from_dict(FORMAT_1)
    assert m.shards[0].final == Checkpoint(1, "ckpt/shard-000/stage-01-bb.pt", "b" * 64, 5, "l")
    assert m.shards[0].slices == (SliceRef("data/shard-000/slice-00-aa.npy", "a" * 64, 5),)
    assert m.feature_names is None and m.retraining is None and m.applied_requests == ("r1",)
    (tmp_path / manifests.FILE).write_bytes(manifests.encode(m))
    again = manifests.read(tmp_path)
    assert again == m and json.loads((tmp_path / manifests.FILE).read_text())["format"] == manifests.FORMAT


def test_dict_style_reads_return_the_json_form_and_cannot_mutate():
    m = manifests.from_dict(FORMAT_1)
    assert m["shards"][0]["checkpoints"][-1]["sha256"] == "b" * 64
    assert m.get("metrics")["ensemble_accuracy"] == 0.5 and m.get("nothing", 7) == 7
    m["shards"][0]["excluded"] = True
    assert m.shards[0].excluded is False


def test_derived_views_and_next_manifests():
    m = manifests.from_dict(FORMAT_1)
    assert m.slice_rows() == [[5]] and m.active_shards(1) == [0]
    assert m.with_shard(0, checkpoints=()).active_shards(1) == [], "a shard not trained through every stage"
    assert m.referenced_files() == {"data/shard-000/slice-00-aa.npy", "ckpt/shard-000/stage-01-bb.pt"}
    excluded = m.with_shard(0, excluded=True)
    assert excluded.active_shards(1) == [] and m.active_shards(1) == [0], "frozen: the old manifest is unchanged"
    assert m.with_metrics(x=1).metrics == {"ensemble_accuracy": 0.5, "x": 1}
    with pytest.raises(AttributeError):
        m.num_classes = 4


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": 99}, "incompatible sisa"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
        ({"shards": [{"slices": [{"file": "x"}]}]}, "malformed"),
    ],
)
def test_bad_manifests_are_refused(change, match):
    with pytest.raises(WorkdirError, match=match):
        manifests.from_dict({**FORMAT_1, **change})


def test_a_missing_or_corrupt_file_says_what_to_do(tmp_path):
    with pytest.raises(WorkdirError, match="holds no trained ensemble"):
        manifests.read(tmp_path)
    (tmp_path / manifests.FILE).write_text("{not json")
    with pytest.raises(WorkdirError, match="is corrupt"):
        manifests.read(tmp_path)


def test_typed_classes_build_what_fit_builds():
    m = Manifest("c", "t", "int", [2], 2, "/s", shards=(ShardState(slices=(SliceRef("f", "d", 1),)),))
    assert manifests.from_dict(m.to_dict()) == m


_text = st.text(max_size=12)  # any unicode: NUL, quotes, and keys that sort around "shards"
_ref = st.builds(SliceRef, st.text(max_size=8), st.text(max_size=8), st.integers(0, 9), st.none() | st.floats(0, 1))
_shard = st.builds(ShardState, st.tuples(_ref), st.just(()), st.booleans(), st.none() | st.tuples(st.integers(0, 5)))


@settings(max_examples=60, deadline=None)
@given(
    shards=st.lists(_shard, max_size=4),
    names=st.none() | st.lists(_text, max_size=3),
    metrics=st.dictionaries(_text, st.integers() | _text, max_size=4),
    storage=_text,
)
def test_encode_is_the_plain_sorted_compact_json(shards, names, metrics, storage):
    """`encode` splices each shard's cached JSON between the other fields: the bytes are exactly what one
    ``json.dumps`` of the whole manifest gives, whatever the strings around it hold."""
    m = replace(manifests.from_dict(FORMAT_1), shards=tuple(shards), feature_names=names, metrics=metrics)
    m = replace(m, storage=storage)
    plain = json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    assert manifests.encode(m) == plain
    assert (
        manifests.encode(m.with_shard(0, excluded=True) if shards else m)
        == json.dumps(
            (m.with_shard(0, excluded=True) if shards else m).to_dict(), sort_keys=True, separators=(",", ":")
        ).encode()
    ), "a changed shard is encoded afresh, not from the cache"


def test_read_returns_what_was_written_and_notices_another_writer(tmp_path):
    """`read` answers from the bytes this process last wrote when the file holds them; a change by anyone
    else (another process, a restore) is read afresh; each caller gets its own mutable fields."""
    m = manifests.from_dict(FORMAT_1)
    manifests.write(tmp_path / manifests.FILE, m)
    a, b = manifests.read(tmp_path), manifests.read(tmp_path)
    assert a == m == b
    a.metrics["ensemble_accuracy"] = 0.0
    a.input_shape.append(9)
    assert manifests.read(tmp_path) == m, "a caller's change does not reach the cache"
    other = m.with_shard(0, excluded=True)
    (tmp_path / manifests.FILE).write_bytes(manifests.encode(other))  # another process's commit
    assert manifests.read(tmp_path).shards[0].excluded is True
    (tmp_path / manifests.FILE).write_bytes(b"{not json")
    with pytest.raises(WorkdirError, match="corrupt"):
        manifests.read(tmp_path)
