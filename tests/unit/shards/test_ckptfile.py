"""The stage checkpoint's file format (`shards.ckptfile`): an exact round trip of every value a checkpoint
holds, nothing unpickled, torch's format for what the header cannot describe and for older workdirs, and a
damaged file refused with `IntegrityError`."""

import io
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shards import ckptfile, training
from shards.errors import IntegrityError
from shards.job import StageRunner
from shards.spec import TrainSpec
from shards.storage import Storage
from shards.store import write_partition

_DT = [np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]
_tensors = (
    st.sampled_from(_DT)
    .flatmap(lambda dt: arrays(dt, st.lists(st.integers(0, 3), max_size=3).map(tuple)))
    .map(lambda a: torch.from_numpy(np.array(a)))
)
_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | _tensors
_trees = st.recursive(
    _leaf,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.lists(kids, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), kids, max_size=3)
        | st.dictionaries(st.integers(-3, 3), kids, max_size=3)
    ),
    max_leaves=12,
)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=80, deadline=None)
@given(tree=_trees, bf16=st.lists(st.floats(-1e3, 1e3, width=32), max_size=4))
def test_every_value_a_checkpoint_holds_round_trips_exactly(tree, bf16):
    ckpt = {"format": training.FORMAT, "tree": tree, "bf16": torch.tensor(bf16, dtype=torch.bfloat16)}
    data = training.save_checkpoint(ckpt)
    assert ckptfile.is_own(data)
    back = training.load_checkpoint(data)
    assert same(ckpt, back), "types (tuple, list, int keys, bool), floats (nan, inf) and tensors bit for bit"
    assert data == training.save_checkpoint(back), "deterministic: the content address of a replay is the same"


def test_what_the_header_cannot_describe_goes_in_torchs_format():
    ckpt = {"format": training.FORMAT, "schedulers": [OrderedDict(a=1)], "w": torch.ones(2)}
    data = training.save_checkpoint(ckpt)
    assert not ckptfile.is_own(data) and data[:2] == b"PK", "torch's zip"
    assert same(dict(training.load_checkpoint(data)["schedulers"][0]), {"a": 1})


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: d[:20], "truncated|cannot be loaded"),
        (lambda d: d[:16] + b"[" + d[17:], "cannot be loaded"),
        (lambda d: d.replace(b"float32", b"object!"), "cannot be loaded"),
        (lambda d: d[:-5], "out of range"),
        (lambda d: b"\x00" * len(d), "cannot be loaded"),
    ],
)
def test_a_damaged_file_is_refused(damage, match):
    data = training.save_checkpoint({"format": training.FORMAT, "w": torch.arange(10.0)})
    with pytest.raises(IntegrityError, match=match):
        training.load_checkpoint(damage(data), "ckpt/x.pt")


def test_a_torch_format_checkpoint_of_an_older_workdir_resumes_bit_identically(tmp_path):
    """An older workdir's checkpoints are torch zip files: a stage resumed from one writes the same bytes as
    a stage resumed from the same state in this format."""
    X, y, ids = tiny_data(n=120)
    store = Storage(str(tmp_path / "store"))
    entries = write_partition(store, ids, X, y, "str", 1, 1, 2)[0]
    spec = TrainSpec(seed=3, model="mlp", model_kwargs={"hidden": [8]}, optim={"lr": 0.05},
                     epochs_per_stage=(2, 2), batch_size=16, input_shape=(6,), num_classes=3)  # fmt: skip
    first, _ = StageRunner().run(store, spec, 0, 1, entries, None, finish=True)
    state = training.load_checkpoint(store.read(first["file"], first["sha256"]))
    buf = io.BytesIO()
    torch.save(state, buf)  # what an older sisa wrote
    old = {**first, "file": "ckpt/old.pt", "sha256": store.write("ckpt/old.pt", buf.getvalue())}
    a, _ = StageRunner().run(store, spec, 0, 2, entries, first, finish=True)
    b, _ = StageRunner().run(store, spec, 0, 2, entries, old, finish=True)
    assert a["sha256"] == b["sha256"]


@pytest.mark.parametrize(
    "value",
    [
        torch.sparse_coo_tensor([[0, 1], [1, 0]], [1.0, 2.0], (2, 2)),
        torch.tensor([1 + 2j]).conj(),
        torch.nn.Parameter(torch.ones(2)),
        torch.ones(2, requires_grad=True),
    ],
    ids=["sparse", "lazy-conj", "parameter", "requires-grad"],
)
def test_a_tensor_the_format_does_not_describe_exactly_goes_in_torchs_format(value):
    data = training.save_checkpoint({"format": training.FORMAT, "v": value})
    assert not ckptfile.is_own(data)
    back = training.load_checkpoint(data)["v"]
    assert type(back) is type(value) and back.layout == value.layout and back.requires_grad == value.requires_grad


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.replace(b'"s":[3]', b'"s":[-3]'),
        lambda h: h.replace(b'"o":0', b'"o":0.0'),
        lambda h: h.replace(b'"s":[3]', b'"s":[2]'),
    ],
    ids=["negative-shape", "float-offset", "short-shape"],
)
def test_a_header_that_does_not_describe_the_bytes_exactly_is_refused(edit):
    data = training.save_checkpoint({"format": training.FORMAT, "w": torch.arange(3.0)})
    n = int.from_bytes(data[8:16], "little")
    head = edit(data[16 : 16 + n])
    assert head != data[16 : 16 + n]
    with pytest.raises(IntegrityError, match="cannot be loaded"):
        training.load_checkpoint(data[:8] + len(head).to_bytes(8, "little") + head + data[16 + n :])
    with pytest.raises(IntegrityError, match="after the last tensor"):
        training.load_checkpoint(data + b"\0")
