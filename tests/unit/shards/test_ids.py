"""Identity: the one canonicalisation of ids (`shards.ids`), property-tested, and every way it was broken."""

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.errors import DataError
from shards.ids import (
    MAX_ID_LENGTH,
    canonical_id,
    canonical_ids,
    parse_text_id,
    parse_text_ids,
    read_ids_file,
    text_ids_kind,
    unique_request,
)
from shards.partition import id_bytes

INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
)


@given(st.lists(INT64, unique=True, max_size=30))
def test_int_ids_round_trip_in_every_container(values):
    for container in (values, tuple(values), np.array(values, dtype=np.int64), pa.array(values, pa.int64())):
        arr, kind = canonical_ids(container)
        assert (kind == "int" or not values) and arr.tolist() == values


@given(st.lists(TEXT, unique=True, max_size=30))
def test_str_ids_are_kept_code_point_for_code_point(values):
    for container in (values, np.array(values, dtype=object), pa.array(values, pa.string())):
        arr, kind = canonical_ids(container, "str")
        assert arr.tolist() == values
    as_bytes, _ = canonical_ids([v.encode() for v in values], "str")
    assert as_bytes.tolist() == values  # bytes from a database driver decode to the same ids


@given(st.lists(st.one_of(INT64, TEXT), unique=True, min_size=1, max_size=20))
def test_distinct_ids_stay_distinct_and_hash_apart(values):
    """Injective: two different inputs never become one id (the bug that deleted the wrong rows)."""
    try:
        arr, _ = canonical_ids(values)
    except DataError as e:
        assert "mix types" in str(e)
        return
    assert len(set(arr.tolist())) == len(values)
    assert len({id_bytes(i) for i in arr.tolist()}) == len(values)


@given(st.one_of(INT64, TEXT))
def test_a_scalar_is_one_id(v):
    forms = [v, np.array(v)] + ([np.int64(v)] if isinstance(v, int) else [np.str_(v), v.encode(), np.bytes_(v.encode())])
    for form in forms:
        assert canonical_ids(form)[0].tolist() == [v]
        assert unique_request(form, "int" if isinstance(v, int) else "str") == [v]


def test_bytes_are_never_iterated_as_byte_values():
    assert canonical_ids(b"12")[0].tolist() == ["12"]
    with pytest.raises(DataError, match="ids are str but this ensemble's ids are int"):
        unique_request(b"12", "int")  # used to delete ids 49 and 50


@given(INT64)
def test_canonical_decimal_text_parses_back(v):
    assert parse_text_id(str(v), "int") == v


@pytest.mark.parametrize("text", ["07", "+7", " 7", "7 ", "٣", "²", "-0", "7\n", "0x10", "1e3", "", "9" * 30])
def test_non_canonical_int_text_is_refused(text):
    with pytest.raises(DataError, match="not an int id|64-bit"):
        parse_text_id(text, "int")


def test_text_column_kind_keeps_leading_zeros_as_strings():
    assert text_ids_kind(["1", "22", "-3"]) == "int"
    assert text_ids_kind(["1", "007"]) == "str"
    ids, kind = parse_text_ids(["1", "007", "alice "])
    assert kind == "str" and ids.tolist() == ["1", "007", "alice "]


@pytest.mark.parametrize(
    "bad, match",
    [
        ([True], "bool"),
        ([5.0], "float"),
        (np.array([1.5]), "int or str"),
        ([None], "not supported"),
        ([""], "empty"),
        (["a\x00"], "NUL"),
        (["\ud800"], "surrogate"),
        (["x" * (MAX_ID_LENGTH + 1)], f"at most {MAX_ID_LENGTH}"),
        (np.array(["x" * (MAX_ID_LENGTH + 1)]), f"at most {MAX_ID_LENGTH}"),
        ([2**63], "64-bit"),
        (np.array([2**64 - 1], dtype=np.uint64), "64-bit"),
        ([1, "a"], "mix types"),
        ([b"\xff"], "UTF-8"),
        (np.zeros((2, 2), np.int64), "one-dimensional"),
    ],
)
def test_bad_ids_get_a_clear_error(bad, match):
    with pytest.raises(DataError, match=match):
        canonical_ids(bad)


def test_kind_is_enforced_both_ways():
    with pytest.raises(DataError, match="ids are str but this ensemble's ids are int"):
        canonical_ids("7", "int")
    with pytest.raises(DataError, match="ids are int but this ensemble's ids are str"):
        canonical_ids(7, "str")
    with pytest.raises(DataError, match="at least one id"):
        unique_request([], "str")
    assert unique_request(["b", "a", "b"], "str") == ["b", "a"]
    assert canonical_id(np.int32(-4)) == (-4, "int")


@given(st.lists(TEXT.filter(lambda t: t != ""), min_size=1, max_size=10))
def test_ids_files_carry_any_id_exactly(values):
    assert read_ids_file(json.dumps(values).encode(), "json") == values
    if not any("\n" in v or "\r" in v for v in values):
        assert read_ids_file(("\n".join(values) + "\n").encode(), "lines") == values
        assert read_ids_file(("\r\n".join(values) + "\r\n").encode(), "lines") == values
    assert read_ids_file("\x00".join(values).encode(), "nul") == values


def test_ids_file_lines_keep_spaces_and_refuse_blank_entries():
    assert read_ids_file(b"alice \n bob\n", "lines") == ["alice ", " bob"]
    with pytest.raises(DataError, match="empty entry"):
        read_ids_file(b"a\n\nb\n", "lines")
    with pytest.raises(DataError, match="JSON array"):
        read_ids_file(b'{"a": 1}', "json")


@settings(max_examples=50)
@given(st.lists(INT64, unique=True, min_size=1, max_size=20), st.data())
def test_ids_file_ints_parse_to_the_same_ids(values, data):
    lines = read_ids_file(("\n".join(map(str, values)) + "\n").encode(), "lines")
    assert [parse_text_id(t, "int") for t in lines] == values
