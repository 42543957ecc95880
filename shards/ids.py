"""Identity: the one place where whatever a caller passes as ids becomes canonical ids.

Every entry point (fit arrays, CSV and Parquet id columns, delete, estimate, shard_of, verify, the CLI and
its id files) goes through `canonical_ids`, so one id always names one row:

- an id is an int (a signed 64-bit integer) or a str (1..MAX_ID_LENGTH code points, valid UTF-8, no NUL);
- one ensemble holds one kind; an id of the other kind is refused, never converted (``"7"`` is not ``7``);
- a scalar (``5``, ``np.int64(5)``, ``"alice"``, ``b"alice"``, ``np.str_``, a 0-d array) means that one id:
  a str or bytes id is never iterated as a sequence of characters or byte values;
- bytes (from a database driver, a Parquet binary column) are decoded as UTF-8 and then are a str id;
- bools, floats and None are refused: ``5.0`` or ``True`` as an id is almost always a bug upstream;
- strings are kept exactly, code point for code point: no stripping, no case folding, no normalisation;
- text that must become an int id (the CLI, a CSV id column) must be its canonical decimal form
  (``-?(0|[1-9][0-9]*)`` in ASCII digits): ``"07"``, ``"+7"``, ``" 7"``, ``"٣"`` and ``"²"`` are refused.
"""

from __future__ import annotations

import re

import numpy as np

from shards.errors import DataError

INT, STR = "int", "str"
KINDS = (INT, STR)
MAX_ID_LENGTH = 256  # code points; slices store ids at fixed width, so one long id widens every row
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)\Z", re.ASCII)


def is_scalar_id(x) -> bool:
    """True when ``x`` is one id rather than a collection of ids."""
    if isinstance(x, np.ndarray):
        return x.ndim == 0
    return isinstance(x, (str, bytes, bytearray, memoryview, int, float, np.generic)) or x is None


def canonical_id(x) -> tuple[int | str, str]:
    """One id as a plain Python int or str, and its kind. Raises DataError saying what to change."""
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x[()]
    if isinstance(x, (bool, np.bool_)):
        raise DataError(f"{x!r} is a bool, not an id; ids are ints or strings")
    if isinstance(x, (int, np.integer)):
        v = int(x)
        if not _INT_MIN <= v <= _INT_MAX:
            raise DataError(f"int id {v} is outside the signed 64-bit range; store such ids as strings")
        return v, INT
    if isinstance(x, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            x = bytes(x).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"bytes id {bytes(x)[:40]!r} is not valid UTF-8; decode it yourself (ids are ints or text)"
            ) from None
    if isinstance(x, str):  # np.str_ included
        return _check_str(str(x)), STR
    if isinstance(x, (float, np.floating)):
        raise DataError(f"{x!r} is a float, not an id; ids are ints or strings (pass int(x) if it is a whole number)")
    raise DataError(f"an id of type {type(x).__name__} is not supported; ids are ints or strings")


def _check_str(s: str) -> str:
    if not s:
        raise DataError("an id is the empty string; every id needs at least one character")
    if len(s) > MAX_ID_LENGTH:
        raise DataError(
            f"an id is {len(s)} characters long (starts {s[:20]!r}); ids are at most {MAX_ID_LENGTH} characters: "
            "use a shorter key, e.g. a hash of the long one"
        )
    if "\x00" in s:
        raise DataError(f"id {s[:40]!r} contains a NUL character; ids may not contain NUL")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"id {s[:40]!r} is not valid Unicode text (a lone surrogate); fix its encoding") from None
    return s


def canonical_ids(ids, kind: str | None = None) -> tuple[np.ndarray, str]:
    """Ids as a 1-d array of int64 or str, and their kind. ``kind`` (the ensemble's) refuses the other kind.

    ``ids`` is one id (a scalar) or a 1-d collection of ids: a list, tuple, numpy array, pandas Series,
    pyarrow array, or any iterable. The result has one entry per input entry, in order.
    """
    if is_scalar_id(ids):
        ids = [ids]
    if not isinstance(ids, (list, tuple, np.ndarray)) and hasattr(ids, "__array__"):
        ids = np.asarray(ids)  # pandas Series, pyarrow arrays: typed columns keep their fast path
    arr = _fast_array(ids)
    if arr is None:
        values = [canonical_id(x) for x in (ids.tolist() if isinstance(ids, np.ndarray) else list(ids))]
        kinds = {k for _, k in values}
        if len(kinds) > 1:
            raise DataError("ids mix types [int, str]; use one kind of id (all int or all str)")
        got = kinds.pop() if kinds else (kind or INT)
        plain = [v for v, _ in values]
        arr = (np.array(plain, dtype=np.int64) if got == INT else np.array(plain, dtype=str).reshape(-1)), got
    out, got = arr
    if kind is not None and got != kind and len(out):
        example = "[17, 942]" if kind == INT else "['u-17', 'u-942']"
        raise DataError(
            f"ids are {got} but this ensemble's ids are {kind}; nothing is converted (\"7\" and 7 are different ids): "
            f"pass {kind} ids, e.g. {example}",
            ids=out[:5].tolist(),
        )
    return out, (kind if kind is not None and not len(out) else got)


def _fast_array(ids) -> tuple[np.ndarray, str] | None:
    """Vectorised checks for numpy int/str/bytes arrays; None when ids need the per-element path."""
    if not isinstance(ids, np.ndarray):
        return None
    if ids.ndim != 1:
        raise DataError(f"ids must be one-dimensional, got shape {ids.shape}")
    k = ids.dtype.kind
    if k in "iu":
        if k == "u" and len(ids) and ids.max() > _INT_MAX:
            raise DataError(f"int id {int(ids.max())} is outside the signed 64-bit range; store such ids as strings")
        return ids.astype(np.int64), INT
    if k == "S":
        return _fast_array(np.array([canonical_id(x)[0] for x in ids.tolist()], dtype=str) if len(ids) else ids.astype(str))
    if k == "U":
        if len(ids):
            lengths = np.char.str_len(ids)
            if lengths.min() == 0 or lengths.max() > MAX_ID_LENGTH or (np.char.find(ids, "\x00") >= 0).any():
                bad = ids[(lengths == 0) | (lengths > MAX_ID_LENGTH) | (np.char.find(ids, "\x00") >= 0)]
                _check_str(str(bad[0]))
            for s in ids.tolist():  # lone surrogates cannot be UTF-8 encoded
                if not s.isascii():
                    _check_str(s)
        return ids, STR
    if k == "O":
        return None
    if k == "b":
        raise DataError("ids are bools; ids are ints or strings")
    if k == "f":
        raise DataError(f"ids are floats ({ids.dtype}); ids must be int or str: convert whole numbers with ids.astype(int)")
    raise DataError(f"ids must be int or str, got dtype {ids.dtype}; convert them with ids.astype(str)")


def unique_request(ids, kind: str) -> list:
    """A deletion request's ids: canonical, of the ensemble's kind, duplicates dropped, order kept."""
    arr, _ = canonical_ids(ids, kind)
    if not len(arr):
        raise DataError("no ids given: name at least one id", ids=[])
    return list(dict.fromkeys(arr.tolist()))


def parse_text_id(text: str, kind: str) -> int | str:
    """An id typed by a person or read from a text file, for an ensemble of ``kind``."""
    if kind == INT:
        if not _DECIMAL.match(text) or text == "-0":
            raise DataError(
                f"{text[:40]!r} is not an int id: this ensemble's ids are integers, written in plain decimal "
                "(no leading zeros, spaces, '+' or non-ASCII digits)"
            )
        return canonical_id(int(text))[0]
    return canonical_id(text)[0]


def text_ids_kind(texts: list[str]) -> str:
    """The kind of a column of ids read as text (CSV): int when every value is a canonical decimal int."""
    for t in texts:
        if not _DECIMAL.match(t) or t == "-0" or not _INT_MIN <= int(t) <= _INT_MAX:
            return STR
    return INT if texts else STR


def parse_text_ids(texts: list[str], kind: str | None = None) -> tuple[np.ndarray, str]:
    """Canonical ids from text; ``kind=None`` infers it with `text_ids_kind` (a CSV id column)."""
    kind = kind or text_ids_kind(texts)
    return canonical_ids([parse_text_id(t, kind) for t in texts], kind)


def read_ids_file(data: bytes, fmt: str) -> list:
    """Ids from an ids file: ``lines`` (one per line; only the line terminator is removed), ``nul``
    (NUL-separated, for ids holding newlines) or ``json`` (a JSON array of ints or strings)."""
    if fmt == "json":
        import json

        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"the ids file is not valid UTF-8 JSON ({e}); write a JSON array like [\"a\", \"b\"]") from None
        if not isinstance(doc, list):
            raise DataError('the ids file must hold a JSON array of ids, like ["a", "b"] or [17, 942]')
        return doc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the ids file is not valid UTF-8 ({e})") from None
    if fmt == "nul":
        parts = text.split("\x00")
    elif fmt == "lines":
        parts = text.split("\n")
        parts = [p[:-1] if p.endswith("\r") else p for p in parts]
    else:
        raise DataError(f"unknown ids file format {fmt!r}; use lines, nul or json")
    if parts and parts[-1] == "":
        parts.pop()  # the terminator of the last id
    if "" in parts:
        raise DataError(
            f"the ids file has an empty entry (entry {parts.index('') + 1}); remove blank lines: ids are never empty"
        )
    return parts
