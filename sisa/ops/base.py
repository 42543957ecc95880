"""The shared start of `fit` (`shards.base`): a pretrained state dict (``model.init``) and base rows
(``fit(base=...)`` or ``data.base``), declared non-erasable and trained once into a stage-0 checkpoint.

`prepare` reads and checks everything before fit writes anything (the init file's digest before it is
loaded, the base rows against the training data); `build` stores the base rows and trains the start;
`refuse_base_ids` keeps `add` from reusing a base row's id (`sisa.ops.locate` finds base rows for `delete`).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import ConfigError, DataError
from shards.schema import make_rows
from shards.storage import Storage
from sisa import data as datamod
from sisa.manifest import Encoder, Manifest, SliceRef, Start
from sisa.ops.locate import base_rows_named, locate


@dataclass
class StartInput:
    """What the start is made of, read and checked: the pretrained checkpoint and the base rows."""

    init: dict | None = None
    init_sha256: str | None = None
    X: np.ndarray | None = None
    y: np.ndarray | None = None
    ids: np.ndarray | None = None
    names: list | None = None  # the feature columns of a data.base CSV or Parquet file
    checked: bool = False

    @property
    def empty(self) -> bool:
        return self.init is None and self.X is None

    @property
    def max_label(self) -> int:
        return -1 if self.y is None or not len(self.y) else int(self.y.max())


def prepare(ctx, base) -> StartInput:
    """Read ``model.init`` (digest first) and the base rows (``base=(X, y[, ids])`` or ``data.base``)."""
    from shards import base as startmod

    c = ctx.config
    got = StartInput()
    if c.model.init is not None:
        where, data = _read_init(ctx, c.model.init.uri)
        got.init, got.init_sha256 = startmod.load_init(data, c.model.init.sha256, where), c.model.init.sha256.lower()
    if base is None and c.data.base is not None:
        path = ctx.workdir.inside(c.data.base.path, "data.base.path")
        Xb, yb, idb, names = datamod.from_file(path, c.data.id_column, c.data.label_column)
        base = (Xb, yb, idb) if idb is not None else (Xb, yb)
        got.names = names
    if base is not None:
        if not isinstance(base, (tuple, list)) or len(base) not in (2, 3):
            raise DataError("base must be (X_base, y_base) or (X_base, y_base, ids_base)")
        got.X, got.y = base[0], base[1]
        got.ids = base[2] if len(base) == 3 else None
    return got


def check(got: StartInput, input_shape, names, kind: str, taken: list, cfg_data) -> None:
    """The base rows against the training data: the same features, labels, ids of the same kind that no
    training or evaluation row has (``taken``)."""
    if got.X is None:
        return
    X = datamod.select_features(got.X, names, cfg_data.id_column, cfg_data.label_column)
    if got.names is not None and names is not None and got.names != list(names):
        if sorted(got.names) != sorted(names):
            raise DataError(
                f"data.base has feature columns {got.names[:20]} but the training data has {list(names)[:20]}; "
                "give the base file exactly the training features"
            )
        X = X[:, [got.names.index(n) for n in names]]
    got.X = datamod.check_features(X, tuple(input_shape))
    if len(got.X) == 0:
        raise DataError("base has no rows; pass base=None (or drop data.base) to train without base data")
    got.y = datamod.check_labels(got.y, len(got.X), "base labels")
    got.checked = True
    if got.ids is None:
        return
    ids, _ = datamod.canonical_ids(got.ids, kind)
    if len(ids) != len(got.X):
        raise DataError(f"base has {len(got.X)} rows but {len(ids)} ids; give one id per base row")
    if len(np.unique(ids)) != len(ids):
        raise DataError("base ids must be unique; some repeat")
    clash = set(ids.tolist()) & set(taken)
    if clash:
        raise _clash(len(clash))
    got.ids = ids


def check_init(ctx, got: StartInput, input_shape, num_classes: int) -> None:
    """A ``model.init`` state dict that does not fit the model is refused before fit writes anything."""
    from types import SimpleNamespace

    from shards import base as startmod

    if got.init is not None:
        shape = SimpleNamespace(
            input_shape=list(input_shape), num_classes=num_classes, engine="eager", base=None, encoder=None
        )
        startmod.check_fits(ctx.spec(shape), got.init, f"model.init.uri {ctx.config.model.init.uri}")


def check_ingested(ctx, got: StartInput, ingested, train_ids: list) -> None:
    """`check` and `check_init` beside a streamed Parquet source, once it is ingested and before a refit
    retires the ensemble it replaces: ``ingested`` is (ingest result, num_classes, staged evaluation file)."""
    if got.empty:
        return
    ing, num_classes, eval_tmp = ingested
    held = np.load(eval_tmp, allow_pickle=False) if eval_tmp and os.path.exists(eval_tmp) else None
    held_ids = held["id"].tolist() if held is not None and held.dtype.names and "id" in held.dtype.names else []
    check(got, ing.input_shape, ing.feature_names, ing.id_kind, [*train_ids, *held_ids], ctx.config.data)
    _check_label_range(got, num_classes)
    check_init(ctx, got, ing.input_shape, num_classes)


def _check_label_range(got: StartInput, num_classes: int) -> None:
    if got.max_label >= num_classes:
        raise DataError(
            f"base labels go up to {got.max_label} but the training data has {num_classes} classes; "
            "set data.num_classes to cover both"
        )


def check_streamed(ctx, m: Manifest, got: StartInput) -> None:
    """`check` beside a streamed Parquet source, once its slices are written (fit removes them on error)."""
    check(got, m.input_shape, m.feature_names, m.id_kind, [], ctx.config.data)
    _check_label_range(got, m.num_classes)
    if got.ids is not None:
        found, held, _, _ = locate(ctx, m, got.ids.tolist())
        if found or held:
            raise _clash(sum(map(len, found.values())) + len(held))


def _clash(n: int) -> DataError:
    return DataError(
        f"{n} base id(s) are also ids of training or evaluation rows; a row is either erasable "
        "(training data) or base data (never erased), not both: rename them or drop the rows from one side",
        ids=[],
    )


def build(ctx, storage: Storage, spec, got: StartInput, kind: str) -> tuple[Start | None, dict]:
    """Store the base rows and train the start once; its record for the manifest and the stage's metrics."""
    from shards import base as startmod

    if got.empty:
        return None, {}
    if got.init is not None:
        startmod.check_fits(spec, got.init, f"model.init.uri {ctx.config.model.init.uri}")
    if got.X is None:
        entry = startmod.write_start(storage, got.init, "init")
        return Start(**entry, init_sha256=got.init_sha256), {}
    rows = make_rows(got.ids, got.y, got.X, kind)  # (y, x) rows when the base rows have no ids
    rows_file = startmod.write_rows(storage, rows)
    lineage = startmod.start_lineage(got.init_sha256, rows_file["sha256"])
    epochs = ctx.config.training.base_epochs or ctx.config.training.epochs
    entry, metrics = startmod.train_base(storage, spec, rows, got.init, epochs, lineage)
    return Start(**entry, init_sha256=got.init_sha256, rows_file=SliceRef.from_dict(rows_file)), metrics


def check_encoder(ctx, got: StartInput, streamed: bool) -> None:
    """``model.encoder: base`` is the start's body: it needs a start; any encoder needs rows fit can encode
    in memory."""
    if ctx.config.model.encoder is None:
        return
    if got.empty and ctx.config.model.encoder == "base":
        raise ConfigError(
            "model.encoder: base is the body of the start every shard shares, and there is none: pass base data "
            "(fit(..., base=(X_base, y_base)) or data.base) or a pretrained start (model.init), or drop model.encoder",
            problems=["model.encoder: no start to take the encoder from"],
        )
    if streamed:
        raise ConfigError(
            "model.encoder does not yet work with a streamed Parquet source: read the table and call "
            "fit(X, y, ids=...), or drop model.encoder",
            problems=["model.encoder: a streamed Parquet source"],
        )


def user_encoder(ctx, input_shape, X, got: StartInput):
    """A user's ``model.encoder`` (module by import path), its weights' digest checked before they are
    loaded, and the module checked on a row of zeros; the features of ``X`` and of the base rows (into
    ``got``), checked finite: (module, weights bytes or None, features of X), before fit writes."""
    from shards import encoder
    from shards.errors import IntegrityError
    from shards.storage import sha256

    e = ctx.config.model.encoder
    data, where = None, e.module
    if e.uri is not None:
        where, data = _read_init(ctx, e.uri)
        if sha256(data) != e.sha256.lower():
            raise IntegrityError(
                f"{where}: sha256 is {sha256(data)} but model.encoder.sha256 says {e.sha256}; it was not loaded. "
                "Put the file's sha256 (`sha256sum FILE`) into model.encoder.sha256",
                path=where,
            )
    module = encoder.user(e.module, input_shape, data, ctx.config.seed, where)
    features = encoder.encode_finite(module, X, "training rows")
    if got.X is not None:
        got.X = encoder.encode_finite(module, got.X, "base rows")
    return module, data, features


def store_encoder(ctx, storage: Storage, m: Manifest, module, data) -> Manifest:
    """Keep a user's encoder weights in the store (content-addressed, purged with the ensemble) and name
    them in the manifest."""
    from dataclasses import replace

    from shards import encoder
    from shards.storage import sha256

    file = digest = None
    if data is not None:
        digest = sha256(data)
        file = f"base/encoder-{digest[:12]}.pt"
        storage.write(file, data, digest=digest)
    rec = Encoder(file=file, sha256=digest, width=encoder.width(module), module=ctx.config.model.encoder.module)
    return replace(m, encoder=rec)


def split_encoder(ctx, storage: Storage, m: Manifest):
    """The manifest whose shards start from the start's last layer (the head) on the features of its frozen
    body (`shards.encoder`), and that body."""
    from dataclasses import replace

    from shards import encoder

    head, rec, body = encoder.split_start(storage, ctx.spec(m), m.base.entry())
    start = replace(m.base, file=head["file"], sha256=head["sha256"])
    return replace(m, base=start, encoder=Encoder(**rec)), body


def refuse_base_ids(ctx, m: Manifest, ids: list) -> None:
    """`add`: a new row may not take a base row's id."""
    base = base_rows_named(ctx, m, ids)
    if base:
        raise DataError(
            f"{len(base)} id(s) are base rows of this ensemble (data.base or fit(base=...)); ids are unique "
            "across training and base rows: give new ids"
        )


def _read_init(ctx, uri: str) -> tuple[str, bytes]:
    """The bytes of ``model.init.uri``: a path (relative to the workdir, or absolute) or an object-store URI."""
    if datamod.is_uri(uri):
        parent, name = posixpath.split(uri)
        store = Storage(parent, ctx.config.storage.options)
        return uri, store.read(name)
    path = Path(uri) if Path(uri).is_absolute() else ctx.workdir.path / uri
    if not path.is_file():
        raise DataError(f"model.init.uri {uri}: no such file ({path})", path=str(path))
    return str(path), path.read_bytes()
