"""The rows of `sisa add --input`: an .npz (X, y, ids; positional) or a CSV/Parquet table whose id and label
columns are the config's and whose features are matched to the training features by name. Under a
deletion-aware ``sharding.placement`` each row's prior (`sisa.risk`) comes from the column named by
``--risk-column`` or ``data.risk_column`` (an npz array of that name): never a feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.errors import DataError
from sisa import data as datamod


def read_addition(path: Path, ens, risk_column: str | None = None):
    """(X, y, ids, risk) of a new batch; ``risk`` is None when the placement is uniform and no
    ``risk_column`` was named (naming one there is refused by `sisa.risk.resolve`, not ignored)."""
    from shards import validation as check
    from shards.ids import parse_text_ids

    d = ens.config.data
    placement = ens.config.sharding.placement
    name = risk_column or (d.risk_column if placement != "uniform" else None)
    if placement != "uniform" and not name:
        raise DataError(_needs_prior(placement, path))
    extra = (name,) if name else ()
    data = datamod.read_file(
        path, ("X", "y", "ids", *extra), text_columns=(d.id_column,), suffixes=(".npz", *datamod.TABLE_SUFFIXES)
    )
    if isinstance(data, dict):
        return data["X"], data["y"], data["ids"], (data[name] if name else None)
    check.check_columns(data.column_names, d.id_column, d.label_column, str(path))
    risk = None
    if name:
        if name not in data.column_names:
            raise DataError(f"{path} has no column {name!r}; " + _needs_prior(placement, path), path=str(path))
        risk = np.asarray(data[name].to_pylist(), dtype=object)
        data = data.drop_columns([name])
    check.check_id_type(data.schema, d.id_column)
    raw, labels = data[d.id_column], data[d.label_column]
    check.check_missing(raw, "id", d.id_column, where=str(path))
    check.check_missing(labels, "label", d.label_column, where=str(path))
    if path.suffix.lower() == ".csv":
        ids = parse_text_ids(raw.to_pylist(), ens.manifest.id_kind)[0]
    else:
        ids = raw.to_numpy(zero_copy_only=False)
    return data, labels.to_numpy(zero_copy_only=False), ids, risk


def _needs_prior(placement: str, path) -> str:
    return (
        f"the ensemble's sharding.placement {placement} places each new row by its deletion prior: give {path} "
        "a column of priors (a probability in [0, 1] or a class name of sharding.risk_classes per row) and name "
        "it with --risk-column NAME or data.risk_column (an npz: an array of that name)"
    )
